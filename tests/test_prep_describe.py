"""Tests of prep_data.py describe / extract_labels / the --llm path (issue 13) and counterfactual --interventions
(issue 14): label extraction against hand-labelled sentences, the template round trip on a 2,000-row phantom sample,
the verifier, a tiny random transformers causal LM built offline (its gibberish is rejected and counted), resume,
bad input, and true counterfactuals of an edit table."""
import csv
import json
import os
import random
import re
import shutil
from collections import Counter

import numpy as np
import pytest

import prep_data as P

POS, NEG, UNC = 2, 1, 3

# Hand-labelled sentences: negation, uncertainty, laterality, synonyms (CheXpert conventions), written out here.
SENTENCES = [
    ("No pleural effusion.", {"Pleural Effusion": NEG}),
    ("There is no evidence of pneumothorax or focal consolidation.", {"Pneumothorax": NEG, "Consolidation": NEG}),
    ("Findings may represent pneumonia.", {"Pneumonia": UNC}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": UNC}),
    ("Possible small left pleural effusion.", {"Pleural Effusion": UNC}),
    ("The cardiac silhouette is enlarged.", {"Cardiomegaly": POS}),
    ("Heart size is normal.", {"Cardiomegaly": NEG}),
    ("Enlargement of the cardiac silhouette.", {"Cardiomegaly": POS}),
    ("Moderate right pleural effusion with adjacent atelectasis.", {"Pleural Effusion": POS, "Atelectasis": POS}),
    ("Left lower lobe consolidation, concerning for pneumonia.", {"Consolidation": POS, "Pneumonia": UNC}),
    ("Bilateral pulmonary edema; no pneumothorax.", {"Edema": POS, "Pneumothorax": NEG}),
    ("Endotracheal tube and right PICC in place.", {"Support Devices": POS}),
    ("A 2 cm nodule in the right upper lobe.", {"Lung Lesion": POS}),
    ("Patchy opacities at both bases.", {"Lung Opacity": POS}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": POS}),
    ("Normal cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": NEG}),
    ("Old healed rib fractures. Pneumothorax is not seen.", {"Fracture": POS, "Pneumothorax": NEG}),
    ("Pleural thickening at the right apex.", {"Pleural Other": POS}),
    ("No acute cardiopulmonary process.", {"No Finding": POS}),
    ("Small effusion but no pneumothorax.", {"Pleural Effusion": POS, "Pneumothorax": NEG}),
    ("No pericardial effusion.", {}),
    ("", {}),
]


@pytest.mark.parametrize("text,want", SENTENCES)
def test_extract_labels_sentences(text, want):
    assert P.extract_labels(text) == want


def test_extract_labels_aggregates_positive_over_uncertain_over_negative():
    assert P.extract_labels("No edema. Possible edema.") == {"Edema": UNC}
    assert P.extract_labels("Possible edema. Mild edema.") == {"Edema": POS}


# ---- the template generator ----------------------------------------------------------------------------------

def phantom_sample(n, seed0=55_000_000):
    """Meta rows of a phantom sample (SCM + observation + rendered details; no pixels)."""
    seeds = np.arange(n) + seed0
    true = P.sample_scm(seeds)
    rec = P.observe(true, seeds)
    sides, severity = P.finding_details(true, seeds)
    rows = []
    for j in range(n):
        row = {"id": f"r{j}", "laterality": json.dumps(sides[j]), "severity": json.dumps(severity[j])}
        for var in P.VARIABLES:
            v = rec[var][j]
            if var == "age":
                row[var] = "" if np.isnan(v) else f"{v:g}"
            elif var in P.LABELS:
                row[var] = {0: "", 1: "0", 2: "1", 3: "-1"}[int(v)]
            else:
                cats = {"sex": ["F", "M"], "race": ["ASIAN", "BLACK", "WHITE"], "view": ["PA", "AP", "LATERAL"],
                        "dataset": P.PHANTOM_SOURCES}[var]
                row[var] = "" if v == 0 else cats[int(v) - 1]
        rows.append(row)
    return rows


def random_rows(n, seed=0):
    """Rows with every label value equally likely (incl. combinations the SCM never makes) and no details."""
    rng = random.Random(seed)
    return [{"id": f"x{j}", "age": rng.choice(["", "7", "34", "81.5"]), "sex": rng.choice(["", "F", "M"]),
             "race": rng.choice(["", "ASIAN", "BLACK", "WHITE"]), "view": rng.choice(["", "PA", "AP", "LATERAL"]),
             **{lab: rng.choice(["", "0", "1", "-1"]) for lab in P.LABELS}} for j in range(n)]


CSV_CODE = {"": 0, "0": NEG, "1": POS, "-1": UNC}


def test_template_round_trips_through_extract_labels():
    """Every positive / uncertain label of 2,000 phantom rows (and 600 rows of random labels) is recovered
    exactly, in both styles (No Finding = -1 too, which CheXpert never writes); no mentioned label contradicts the
    row; the agreement on recorded labels is reported."""
    agree, total = Counter(), Counter()
    for rows in (phantom_sample(2000), random_rows(600)):
        for row in rows:
            want = {lab: CSV_CODE[row[lab]] for lab in P.LABELS}
            for style in ("impression", "full"):
                report, findings = P.describe_row(row, random.Random(f"7:{row['id']}"), style)
                for text in (report, findings) if style == "full" else (report,):
                    got = P.extract_labels(text)
                    for lab in P.LABELS:
                        if want[lab] in (POS, UNC):
                            assert got.get(lab) == want[lab], (lab, text, row)
                        if lab in got:
                            assert got[lab] == want[lab], (lab, text, row)
                if style == "impression":
                    for lab in P.LABELS:
                        kind = {POS: "positive", UNC: "uncertain", NEG: "negative"}.get(want[lab])
                        total[kind] += 1
                        agree[kind] += got.get(lab) == want[lab]
    print("template -> extract_labels agreement: " + ", ".join(f"{k} {agree[k]}/{total[k]} = {agree[k] / total[k]:.3f}"
                                                             for k in ("positive", "uncertain", "negative")))
    assert agree["positive"] == total["positive"] > 1000 and agree["uncertain"] == total["uncertain"] > 100
    assert 0.1 < agree["negative"] / total["negative"] < 0.9        # negatives are sampled: some said, not all


def test_template_never_invents_details():
    """No severity / laterality / site words unless the row holds them; phantom details appear as recorded."""
    words = re.compile(r"\b(mild|moderate|severe|left|right|bilateral|basilar|rib|lobe|upper|lower)\b", re.I)
    for row in random_rows(600, seed=1):
        for text in P.describe_row(row, random.Random(row["id"]), "full"):
            assert not words.search(text), text
    for row in phantom_sample(400):
        report, _ = P.describe_row(row, random.Random(row["id"]), "impression")
        sev, side = json.loads(row["severity"]), json.loads(row["laterality"])
        for w in set(m.lower() for m in words.findall(report)):
            holders = [lab for lab in P.LABELS if row.get(lab) in ("1", "-1") and w in (sev.get(lab), side.get(lab))]
            assert holders, (w, report, row)


SECTIONS = re.compile(r"Patient Information: (.*) Technique: (.*?)(?: Findings: (.*))? Impression: (.*)")


def test_template_sections_of_table_5_and_no_labels():
    """chexgen Ext. Data Table 5's report: Patient Information (demographics), Technique (view), Impression; style
    full adds Findings (typical appearances) to the `findings` column."""
    row = {"id": "a", "age": "65", "sex": "M", "race": "WHITE", "view": "PA", **{lab: "" for lab in P.LABELS}}
    report, findings = P.describe_row(row, random.Random(0), "full")
    assert SECTIONS.fullmatch(report)[4] == P.NO_LABELS and SECTIONS.fullmatch(findings)[3] == P.NO_LABELS
    assert P.extract_labels(report) == {}
    texts = {P.describe_row(row, random.Random(s), "impression")[0] for s in range(30)}
    for t in texts:
        who, tech, found, imp = SECTIONS.fullmatch(t).groups()
        assert "65" in who and "white male" in who.lower() and "PA" in tech and found is None
    assert len(texts) > 1
    row.update({"Pneumonia": "1"})
    report, findings = P.describe_row(row, random.Random(1), "full")
    r, f = SECTIONS.fullmatch(report).groups(), SECTIONS.fullmatch(findings).groups()
    assert r[:2] == f[:2] and r[3] == f[3] and "pneumonia" in f[2].lower() and "airspace" in f[2]
    row.update({"age": "", "sex": "", "race": "", "view": ""})
    for s_ in range(30):
        who, tech, _, imp = SECTIONS.fullmatch(P.describe_row(row, random.Random(s_))[0]).groups()
        assert who == "Not recorded." and "not recorded" in tech and "pneumonia" in imp.lower()
        assert not re.search(r"year|male|female|PA|AP|lateral", who + tech)


def test_length_control_keeps_every_finding():
    """--max-words: the template drops trailing negative sentences, never a positive or hedged one."""
    row = {"id": "b", "age": "70", "sex": "F", "race": "BLACK", "view": "AP", **{lab: "0" for lab in P.LABELS}}
    row.update({"Edema": "1", "Pneumonia": "-1", "No Finding": ""})
    for seed in range(40):
        full, _ = P.describe_row(row, random.Random(seed), max_words=0)
        short, _ = P.describe_row(row, random.Random(seed), max_words=25)
        imp_full, imp_short = SECTIONS.fullmatch(full)[4], SECTIONS.fullmatch(short)[4]
        assert imp_full.startswith(imp_short)                      # a prefix: trailing sentences dropped
        got = P.extract_labels(short)
        assert got.get("Edema") == POS and got.get("Pneumonia") == UNC
        kept = [x for x in re.split(r"(?<=\.) ", imp_short)]
        assert len(short.split()) <= 25 or not any(c == NEG for x in kept[-1:] for c in P.extract_labels(x).values())
    assert any(len(P.describe_row(row, random.Random(s_), max_words=0)[0].split()) > 25 for s_ in range(40))


def test_phantom_report_shares_the_phrasing():
    """The phantom's reports read back to their recorded positives through the same tables."""
    for row in phantom_sample(300, seed0=9_000_000):
        codes = {lab: CSV_CODE[row[lab]] for lab in P.LABELS}
        text = P.phantom_report(codes, json.loads(row["laterality"]), json.loads(row["severity"]))
        got = P.extract_labels(text)
        assert all(got.get(lab) == c for lab, c in codes.items() if c in (POS, UNC) and lab != "No Finding"), text
        assert all(got[lab] == codes[lab] for lab in got), text


# ---- describe on a dataset -----------------------------------------------------------------------------------

@pytest.fixture
def small_data(tmp_path):
    """A 30-row dataset folder (meta.csv + info.json; describe reads no pixels); rows 0-2 have no labels, rows 3-5
    come with their own report."""
    rows = random_rows(30, seed=5)
    for j, r in enumerate(rows):
        r.update({"patient_id": f"p{j}", "study_id": f"s{j}", "split": "train", "dataset": "x", "report": "",
                  "findings": "", "shard": 0, "index": j, "source_path": ""})
        if j < 3:
            r.update({lab: "" for lab in P.LABELS})
        elif j < 6:
            r["report"] = f"Original report {j}."
    d = tmp_path / "d"
    P.write_csv(str(d / "meta.csv"), rows, P.META_COLUMNS)
    P.write_json(str(d / "info.json"), {"size": 32, "datasets": ["x"]})
    return str(d)


def meta(d):
    with open(os.path.join(d, "meta.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_describe_cli(small_data, tmp_path, capsys):
    P.main(["describe", "--data", small_data, "--only-missing", "--seed", "3"])
    assert "3 without labels" in capsys.readouterr().out
    rows = meta(small_data)
    assert [r["report"] for r in rows[3:6]] == [f"Original report {j}." for j in range(3, 6)]   # kept
    assert all(r["report"].endswith(P.NO_LABELS) for r in rows[:3])
    assert all(r["report"] and r["report_source"] == "template" for r in rows[:3] + rows[6:])
    for r in rows[6:]:
        want = {lab: CSV_CODE[r[lab]] for lab in P.LABELS}
        got = P.extract_labels(r["report"])
        assert all(got.get(lab) == c for lab, c in want.items() if c in (POS, UNC))
    first = [r["report"] for r in rows]
    P.main(["describe", "--data", small_data, "--only-missing", "--seed", "3"])          # deterministic
    assert [r["report"] for r in meta(small_data)] == first
    P.main(["describe", "--data", small_data, "--seed", "4", "--style", "full"])        # all rows, new phrasing
    again = meta(small_data)
    assert again[3]["report"] != "Original report 3." and sum(a["report"] != b for a, b in zip(again, first)) > 5
    assert all(r["findings"] for r in again)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="meta.csv: no such file"):
        P.main(["describe", "--data", str(empty)])


def test_extract_labels_cli(small_data, tmp_path):
    P.main(["describe", "--data", small_data])
    out = str(tmp_path / "labels.csv")
    P.main(["extract-labels", "--csv", os.path.join(small_data, "meta.csv"), "--out", out])
    got, rows = meta_file(out), meta(small_data)
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert all(g[lab] == r[lab] for g, r in zip(got, rows) for lab in P.LABELS if r[lab] in ("1", "-1"))


def meta_file(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- the verifier and the LLM path ---------------------------------------------------------------------------

def test_verify_report_rules():
    codes = {lab: 0 for lab in P.LABELS}
    codes.update({"Pneumonia": POS, "Edema": UNC, "Pneumothorax": NEG})
    assert P.verify_report("Right pneumonia. Possible edema. No pneumothorax.", codes) == []
    assert P.verify_report("Possible edema.", codes) == ["Pneumonia: not mentioned"]
    assert P.verify_report("No pneumonia. Possible edema.", codes) == ["Pneumonia: negated"]
    assert P.verify_report("Pneumonia. Edema.", codes) == ["Edema: hedging"]
    assert P.verify_report("Pneumonia. Possible edema. Cardiomegaly.", codes) == ["Cardiomegaly: not in the row"]
    only_neg = {lab: (NEG if lab == "Pneumothorax" else 0) for lab in P.LABELS}
    assert P.verify_report("The lungs are well expanded.", only_neg) == ["no recorded finding mentioned"]


def fake_llm(negate=frozenset()):
    """A stand-in generator that answers from the prompt's Diagnosis line (negating the labels in `negate`)."""
    def generate(prompts):
        out = []
        for p in prompts:
            m = re.search(r"Diagnosis: (.*?); Uncertain: (.*?); Negative: (.*)", p)
            pos, unc, neg = ([x for x in g.split(", ") if x != "none"] for g in m.groups())
            said = ["No acute cardiopulmonary process" if x == "No Finding" else ("No " if x in negate else "") + x
                    for x in pos] + ["Possible " + x for x in unc]
            said += ["No " + x for x in neg if x != "No Finding"][:1] if not said else []
            out.append("Patient Information: adult. Findings: see below. Impression: " + ". ".join(said) + ".")
        return out
    return generate


def test_llm_outputs_verified_and_counted(small_data):
    st = P.describe_dataset(small_data, generate=fake_llm(), batch_size=4)
    done = meta(small_data)
    assert st["llm-qc"] + st["llm-rejected"] == 27 and st["llm-qc"] > 20 and st["llm"] == 0
    assert all(r["report_source"] == "template" for r in done[:3])
    accepted = [r for r in done if r["report_source"] == "llm-qc"]
    for r in accepted:                  # Table 5's sections: metadata header (as the template's), the LLM's Impression
        who, tech, _, imp = SECTIONS.fullmatch(r["report"]).groups()
        t_who, t_tech, _, _ = SECTIONS.fullmatch(P.describe_row(r, random.Random(f"0:{r['id']}"))[0]).groups()
        assert (who, tech) == (t_who, t_tech) and "adult" not in who and not P.verify_report(imp, P.row_codes(r))
    # length control: an LLM impression that makes the report run over --max-words is rejected like a wrong one
    long_llm = lambda prompts: [t.replace("Impression: ", "Impression: " + "Stable appearance. " * 40)
                                for t in fake_llm()(prompts)]
    for r in done:
        r["report_source"] = ""
    P.write_csv(os.path.join(small_data, "meta.csv"), done, list(done[0]))
    st = P.describe_dataset(small_data, generate=long_llm, qc_generate=False, batch_size=8)
    assert st["llm-rejected"] == 27 and st["reject: over 80 words"] == len(accepted)   # the others fail the verifier
    assert all(r["report"] == P.describe_row(r, random.Random(f"0:{r['id']}"))[0] for r in meta(small_data)[3:])
    # a generator that negates Pneumonia: every row with Pneumonia = 1 is rejected and keeps the template's report
    for r in done:
        r["report_source"] = ""
    P.write_csv(os.path.join(small_data, "meta.csv"), done, list(done[0]))
    st = P.describe_dataset(small_data, generate=fake_llm({"Pneumonia"}), qc_generate=False, batch_size=7)
    done = meta(small_data)
    pneu = [r for r in done if r["Pneumonia"] == "1"]
    assert pneu and all(r["report_source"] == "llm-rejected" for r in pneu)
    assert all(r["report"] == P.describe_row(r, random.Random(f"0:{r['id']}"))[0] for r in pneu)
    assert st["reject: Pneumonia: negated"] == len(pneu) and st["llm-qc"] == 0


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random GPT-2 with a word-level tokenizer, saved offline (its outputs are gibberish)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    words = ["[UNK]", "[PAD]", "[EOS]", "the", "a", "is", "of", "and", "chest", "view", "patient", "year", "old",
             "male", "female", "report", "seen", "lungs", "in", "with", "to", "impression", ":", ".", ",", "bones",
             "soft", "tissues", "study", "image", "compared", "prior", "stable", "clinical", "history"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}Report :{% endif %}")
    d = str(tmp_path_factory.mktemp("tinylm"))
    tok.save_pretrained(d)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=1024, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=2, eos_token_id=2, pad_token_id=1)).save_pretrained(d)
    return d


def test_tiny_llm_gibberish_rejected_and_resumed(small_data, tiny_lm, capsys):
    labelled = 27                                                   # rows 3..29 hold labels
    args = ["describe", "--data", small_data, "--llm", tiny_lm, "--max-new-tokens", "12", "--batch-size", "4"]
    P.main(args + ["--limit", "10"])                                # first run stops after 10 rows
    out = capsys.readouterr().out
    rows = meta(small_data)
    assert [r["report_source"] for r in rows[:10]] == ["template"] * 3 + ["llm-rejected"] * 7
    assert all(r["report_source"] == "" and r["report"] in ("", f"Original report {j}.")
               for j, r in enumerate(rows[10:], 10))
    assert "rejected 7 (template kept)" in out
    assert all(r["report"] == P.describe_row(r, random.Random(f"0:{r['id']}"))[0] for r in rows[:10])
    P.main(args)                                                    # resume: only the rows the LLM has not seen
    out = capsys.readouterr().out
    st = json.load(open(os.path.join(small_data, "describe.json")))["stats"]
    assert st["todo"] == 30 - 7 and st["llm-rejected"] == labelled - 7 and "accepted 0 after QC, 0 before" in out
    assert all(r["report_source"] == "llm-rejected" for r in meta(small_data)[3:])


def test_llm_that_cannot_be_loaded(small_data, tmp_path):
    bad = str(tmp_path / "no-such-model")
    with pytest.raises(SystemExit, match=re.escape(bad) + ".*cannot load") as e:
        P.main(["describe", "--data", small_data, "--llm", bad])
    assert "\n" not in str(e.value)


# ---- counterfactual --interventions (issue 14) ---------------------------------------------------------------

def test_counterfactual_of_an_edit_table(tmp_path):
    data = str(tmp_path / "d")
    P.make_phantom(data, n=6, size=32, seed=4)
    src = P.read_dataset_meta(data)
    edits = [("e0", src[0], "sex=F"), ("e1", src[1], "Pleural Effusion=1"), ("e2", src[2], ""),
             ("e3", src[0], "age=90"), ("e4", src[3], "view=LATERAL"), ("e5", src[4], "sex=F")]
    e_dir = tmp_path / "E"
    P.write_csv(str(e_dir / "meta.csv"), [{"id": i, "source_id": s["id"], "intervention": iv, "sex": "?"}
                                          for i, s, iv in edits], ["id", "source_id", "intervention", "sex"])
    out = str(tmp_path / "T")
    P.main(["counterfactual", "--data", data, "--interventions", str(e_dir / "meta.csv"), "--out", out])
    t = P.read_dataset_meta(out)
    assert [r["id"] for r in t] == [e[0] for e in edits]
    assert [(r["source_id"], r["intervention"], r["seed"]) for r in t] == \
        [(s["id"], iv, s["seed"]) for _, s, iv in edits]
    imgs, orig = P.load_pixels(out, t), P.load_pixels(data, src)
    assert np.array_equal(imgs[2], orig[2])                         # the empty intervention is the original image
    assert not np.array_equal(imgs[1], orig[1]) and not np.array_equal(imgs[4], orig[3])
    codes = {"sex=F": {"sex": 1}, "Pleural Effusion=1": {"Pleural Effusion": POS}, "": None, "age=90": {"age": 90.0},
             "view=LATERAL": {"view": 3}}
    for r, (_, s, iv) in zip(t, edits):                             # the recorded truth under do(): sample_scm
        seed = np.array([int(s["seed"])])
        rec = P.observe(P.sample_scm(seed, codes[iv]), seed)
        want = {v: rec[v][0] for v in P.VARIABLES}
        assert P.csv_to_codes(r, P.PHANTOM_SOURCES)["Pleural Effusion"] == want["Pleural Effusion"]
        assert r["sex"] == {0: "", 1: "F", 2: "M"}[want["sex"]] and r["view"] == {0: "", 1: "PA", 2: "AP",
                                                                                  3: "LATERAL"}[want["view"]]
        assert r["race"] == s["race"] and r["dataset"] == s["dataset"] and r["patient_id"] == s["patient_id"]
    # the same rows through the single-intervention path give the same images
    cf = str(tmp_path / "cf")
    P.main(["counterfactual", "--data", data, "--set", "sex=F", "--ids", f"{src[0]['id']},{src[4]['id']}", "--out", cf])
    assert np.array_equal(P.load_pixels(cf, P.read_dataset_meta(cf)), imgs[[0, 5]])
    shutil.rmtree(out)
    with open(e_dir / "meta.csv", "a") as f:
        f.write("e6,nope,sex=F,?\n")
    with pytest.raises(SystemExit, match="source_id 'nope'"):
        P.main(["counterfactual", "--data", data, "--interventions", str(e_dir / "meta.csv"), "--out", out])
    P.write_csv(str(e_dir / "meta.csv"), [{"id": "e0", "source_id": src[0]["id"], "intervention": "colour=red"}],
                ["id", "source_id", "intervention"])
    with pytest.raises(SystemExit, match=r"E/meta.csv \(edit 'e0'\): unknown variable 'colour'"):
        P.main(["counterfactual", "--data", data, "--interventions", str(e_dir / "meta.csv"), "--out", out])

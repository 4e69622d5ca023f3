"""Tests of prep_data.py's real-dataset path: every source adapter on a tiny fake tree in that source's released
layout (CSV headers as shipped; DICOMs written with pydicom: MONOCHROME1 with a VOI window, 12- and 16-bit;
JPEG/PNG 8/16-bit; two real NIH radiographs), meta.csv checked row by row, pixels checked against float64
references written here (DICOM PS3.3 grayscale pipeline), patient-level splits, merge, corrupt inputs, bad columns,
resume."""
import csv
import glob
import gzip
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import prep_data as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "..", "shared", "fixtures", "real")
try:
    import pydicom
except ImportError:
    pydicom = None
needs_dicom = pytest.mark.skipif(pydicom is None, reason="pydicom not installed (pip install pydicom)")
S = 32                                                   # output size of most tests: square 32 px sources -> no resize

# ----------------------------------------------------------------------------------------------------------------
# Writers for the fake trees, and independent references


def write_csv(path, header, rows, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_dicom(path, stored, photometric="MONOCHROME2", bits=16, slope=None, intercept=None, window=None,
                age=None, sex=None):
    """A single-frame DX DICOM file (explicit VR little endian) with the given stored values."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    assert stored.max() < 2 ** bits
    ds.PixelData = stored.astype("<u2").tobytes()
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = str(window[0]), str(window[1])
    if age is not None:
        ds.PatientAge, ds.PatientSex = age, sex
    if int(pydicom.__version__.split(".")[0]) < 3:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    else:
        ds.save_as(path, enforce_file_format=True)


def ref_linear_window(x, c, w):
    """VOI LINEAR function, DICOM PS3.3 C.11.2.1.2.1, written out piecewise in float64."""
    y = ((x - (c - 0.5)) / (w - 1) + 0.5)
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, y)
    return np.where(x > c - 0.5 + (w - 1) / 2, 1.0, y)


def ref_uint16(y):
    """Min-max to the full 16-bit range, as radit §3 describes (reference for a no-resize output)."""
    y = np.asarray(y, np.float64)
    return np.round((y - y.min()) / (y.max() - y.min()) * 65535)


def ramp(h, w, lo, hi, seed=0):
    """A test image: a diagonal ramp plus a little texture, values in [lo, hi] (integers)."""
    yy, xx = np.mgrid[0:h, 0:w]
    t = (xx + 2 * yy) / (w - 1 + 2 * (h - 1))
    t = t + 0.02 * np.random.default_rng(seed).standard_normal((h, w))
    return np.round(lo + (hi - lo) * np.clip(t, 0, 1)).astype(np.int64)


def run(*argv):
    P.main([str(a) for a in argv])


def meta(out):
    with open(os.path.join(out, "meta.csv"), newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def pixels(out, row):
    return P.load_pixels(out, [row])[0, 0].astype(np.float64)


def labels(row):
    """The non-missing labels of a row, as {name: value}."""
    return {k: row[k] for k in P.LABELS if row[k] != ""}


def assert_no_leak(rows):
    split_of = {}
    for r in rows:
        k = (r["dataset"], r["patient_id"])
        assert split_of.setdefault(k, r["split"]) == r["split"], f"patient {k} in two splits"


def summary(out):
    with open(os.path.join(out, "info.json")) as f:
        return json.load(f)["summary"]

# ----------------------------------------------------------------------------------------------------------------
# Image pipeline


def test_harmonisers():
    assert [P.parse_age(v) for v in ["58", "58.0", "058Y", "018M", "85 or more", "40-44", "", "abc", "150", "-3"]] \
        == [58, 58, 58, 1.5, 85, 42.5, None, None, None, None]
    assert [P.norm_view(v) for v in ["PA", "POSTERO_ANTERIOR", "AP AXIAL", "AP_horizontal", "L", "LL", "LATERAL",
                                     "AP LLD", "RAO", "", None]] == \
        ["PA", "PA", "AP", "AP", "LATERAL", "LATERAL", "LATERAL", "", "", "", ""]
    assert [P.norm_race(v) for v in ["WHITE - RUSSIAN", "BLACK/AFRICAN AMERICAN", "Asian, non-Hispanic", "OTHER",
                                     "White, Black", "UNKNOWN", "Native Hawaiian or Other Pacific Islander"]] == \
        ["WHITE", "BLACK", "ASIAN", "", "", "", ""]
    assert [P.norm_sex(v) for v in ["F", "Male", "female", "O", "Unknown", ""]] == ["F", "M", "F", "", "", ""]
    assert [P.norm_label(v) for v in ["1.0", "0", "-1.0", "", "nan"]] == ["1", "0", "-1", "", ""]
    for bad in ["2", "yes", "0.5"]:
        with pytest.raises(P.Skip):
            P.norm_label(bad)
    assert P.years_between("1946.0", "20140109") == 68 and P.years_between("19460801", "20140709") == 67
    # the hash split is deterministic, patient-level, and close to the requested fractions
    keys = [f"x/{i}" for i in range(20000)]
    s = [P.hash_split(k, 0.1, 0.2) for k in keys]
    assert s == [P.hash_split(k, 0.1, 0.2) for k in keys]
    assert abs(s.count("test") / 2e4 - 0.2) < 0.015 and abs(s.count("val") / 2e4 - 0.1) < 0.015


def test_resize_pad_aspect_and_antialias():
    # 64 tall x 128 wide linear ramp along x -> 32 x 64 content centred in 64 x 64: 16 black rows above and below
    x = np.tile(np.linspace(0.0, 1.0, 128), (64, 1))
    out = P.resize_pad(x, 64).astype(np.float64) / 65535
    assert out.shape == (64, 64) and np.all(out[:16] == 0) and np.all(out[48:] == 0)
    # Lanczos reproduces a linear ramp: pixel j covers input pixels 2j, 2j+1, whose mean is the reference
    ref = x[:, 0::2][:32] * 0.5 + x[:, 1::2][:32] * 0.5
    assert np.abs(out[16:48, 3:-3] - ref[:, 3:-3]).max() < 2e-3
    # tall image: columns padded; a checkerboard (Nyquist) must average out, not alias
    cb = (np.indices((256, 128)).sum(0) % 2).astype(np.float64)
    out = P.resize_pad(cb, 32).astype(np.float64) / 65535
    assert np.all(out[:, :8] == 0) and np.all(out[:, 24:] == 0)
    assert np.abs(out[2:-2, 10:22] - 0.5).max() < 0.02


@needs_dicom
def test_dicom_pipeline_monochrome1_window_rescale_12bit(tmp_path):
    stored = ramp(S, S, 0, 4095)
    path = str(tmp_path / "a.dcm")
    write_dicom(path, stored, "MONOCHROME1", bits=12, slope=2, intercept=-1024, window=(2000, 3001))
    x, _ = P.load_source_image([path])
    got = P.resize_pad(P.to_unit_range(x), S).astype(np.float64)
    modality = stored * 2.0 - 1024.0
    expect = ref_uint16(1.0 - ref_linear_window(modality, 2000.0, 3001.0))   # windowed, then inverted
    assert np.abs(got - expect).max() <= 1
    assert got[0, 0] == 65535 and got[-1, -1] == 0           # lowest stored value is brightest in MONOCHROME1
    assert (ref_linear_window(modality, 2000, 3001) == 1).any() and (ref_linear_window(modality, 2000, 3001) == 0).any()


@needs_dicom
def test_dicom_pipeline_16bit_monochrome2_and_raster(tmp_path):
    stored = ramp(S, S, 100, 60000, seed=1)
    write_dicom(str(tmp_path / "b.dcm"), stored, bits=16)
    x, _ = P.load_source_image([str(tmp_path / "b.dcm")])
    assert np.abs(P.resize_pad(P.to_unit_range(x), S) - ref_uint16(stored)).max() <= 1
    Image.fromarray(stored.astype(np.uint16)).save(tmp_path / "c.png")             # 16-bit PNG
    x, _ = P.load_source_image([str(tmp_path / "missing.png"), str(tmp_path / "c.png")])
    assert np.abs(P.resize_pad(P.to_unit_range(x), S) - ref_uint16(stored)).max() <= 1
    s8 = ramp(S, S, 10, 240, seed=2).astype(np.uint8)
    Image.fromarray(s8).save(tmp_path / "d.png")
    x, _ = P.load_source_image([str(tmp_path / "d.png")])
    assert np.abs(P.resize_pad(P.to_unit_range(x), S) - ref_uint16(s8)).max() <= 1


@needs_dicom
def test_dicom_voi_lut_sequence_wins_over_window(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    stored = ramp(S, S, 0, 4095, seed=4)
    path = str(tmp_path / "lut.dcm")
    write_dicom(path, stored, bits=12, window=(100, 10))
    ds = pydicom.dcmread(path)
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 255).astype(np.int64)       # a gamma-like VOI LUT
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])                                # LUT Descriptor
    item.add_new(0x00283006, "US", lut.tolist())                                 # LUT Data
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path)
    x, _ = P.load_source_image([path])
    assert np.array_equal(x, lut[stored].astype(np.float64))


def test_missing_pydicom_is_a_clear_error(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pydicom", None)               # `import pydicom` now raises ImportError
    with pytest.raises(SystemExit, match="pip install pydicom"):
        run("vindr-cxr", "--root", tmp_path, "--out", tmp_path / "o")


def test_corrupt_and_missing_are_skips(tmp_path):
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "t.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "flat.png")
    cases = [("t.png", "unreadable image"), ("t.dcm", "unreadable image"), ("nope.png", "missing image")]
    for name, reason in cases if pydicom is not None else cases[::2]:    # without pydicom a .dcm is a SystemExit
        with pytest.raises(P.Skip, match=reason):
            P.load_source_image([str(tmp_path / name)])
    if pydicom is not None:        # a compressed syntax pydicom cannot decode is counted under its own name
        from pydicom.encaps import encapsulate
        from pydicom.uid import JPEG2000Lossless
        write_dicom(str(tmp_path / "j.dcm"), np.zeros((4, 4), np.int64))
        ds = pydicom.dcmread(str(tmp_path / "j.dcm"))
        ds.file_meta.TransferSyntaxUID, ds.PixelData = JPEG2000Lossless, encapsulate([b"\xff\x4f\xff\x51broken"])
        ds["PixelData"].is_undefined_length = True
        ds.save_as(str(tmp_path / "j.dcm"))
        with pytest.raises(P.Skip, match=r"undecodable DICOM pixels \(JPEG 2000"):
            P.load_source_image([str(tmp_path / "j.dcm")])
    with pytest.raises(P.Skip, match="blank image"):
        P.to_unit_range(P.load_source_image([str(tmp_path / "flat.png")])[0])


def test_report_sections():
    text = ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  cough\n"
            " FINDINGS:  The lungs are clear.\n No effusion.\n\n IMPRESSION:  No acute\n cardiopulmonary process.\n")
    assert P.impression_findings(text) == ("No acute cardiopulmonary process.", "The lungs are clear. No effusion.")

# ----------------------------------------------------------------------------------------------------------------
# Adapters, each on a fake tree in the source's layout

MIMIC_META = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
              "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
              "PatientOrientationCodeSequence_CodeMeaning"]
CHEX_ORDER = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
              "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
              "Pneumothorax", "Support Devices"]                  # MIMIC-CXR-JPG chexpert.csv column order


def mimic_tree(root, ext):
    """4 images of 3 patients: PA, LATERAL, AP (missing file), PA; reports; MIMIC-IV hosp/ tables."""
    imgs = [("d1", "10000032", "50414267", "PA", "21800506"), ("d2", "10000032", "50414267", "LATERAL", "21800506"),
            ("d3", "10000764", "57375967", "AP", "21320709"), ("d4", "19999987", "58971208", "PA", "21451110")]
    for k, (d, sub, stu, _, _) in enumerate(imgs[:2] + imgs[3:]):
        folder = os.path.join(root, "files", f"p{sub[:2]}", f"p{sub}", f"s{stu}")
        arr = ramp(S, S, 0, 255, seed=k).astype(np.uint8)
        if ext == ".jpg":
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(arr).save(os.path.join(folder, d + ".jpg"), quality=95)
        else:
            write_dicom(os.path.join(folder, d + ".dcm"), arr.astype(np.int64) * 16, bits=12)
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"), MIMIC_META,
              [[d, sub, stu, "CHEST", v, S, S, date, "0", "", "", ""] for d, sub, stu, v, date in imgs], gz=True)
    lab = {"50414267": {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0"},
           "57375967": {"No Finding": "1.0"}, "58971208": {"Support Devices": "1.0", "Pneumothorax": "-1.0"}}
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"), ["subject_id", "study_id"] + CHEX_ORDER,
              [[s, st] + [lab[st].get(c, "") for c in CHEX_ORDER] for _, s, st, _, _ in imgs[::2] + imgs[3:]], gz=True)
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), ["dicom_id", "study_id", "subject_id", "split"],
              [["d1", "50414267", "10000032", "train"], ["d2", "50414267", "10000032", "train"],
               ["d3", "57375967", "10000764", "validate"], ["d4", "58971208", "19999987", "test"]], gz=True)
    rep = os.path.join(root, "mimic-cxr-reports", "files", "p10", "p10000032", "s50414267.txt")
    os.makedirs(os.path.dirname(rep))
    with open(rep, "w") as f:
        f.write(" FINAL REPORT\n INDICATION: dyspnea\n FINDINGS: Heart is enlarged.\n Mild edema.\n\n"
                " IMPRESSION: Cardiomegaly with\n possible mild edema.\n")
    hosp = os.path.join(root, "mimiciv", "hosp")
    write_csv(os.path.join(hosp, "patients.csv.gz"), ["subject_id", "gender", "anchor_age", "anchor_year",
                                                      "anchor_year_group", "dod"],
              [["10000032", "F", "52", "2180", "2014 - 2016", ""], ["10000764", "M", "86", "2132", "2014 - 2016", ""],
               ["19999987", "F", "57", "2145", "2011 - 2013", ""]], gz=True)
    write_csv(os.path.join(hosp, "admissions.csv.gz"), ["subject_id", "hadm_id", "admittime", "race"],
              [["10000032", "1", "", "WHITE"], ["10000032", "2", "", "WHITE - RUSSIAN"],
               ["10000764", "3", "", "ASIAN - CHINESE"], ["10000764", "4", "", "BLACK/AFRICAN AMERICAN"],
               ["19999987", "5", "", "UNABLE TO OBTAIN"]], gz=True)


def test_mimic_cxr_jpg(tmp_path):
    root, out = str(tmp_path / "mimic"), str(tmp_path / "out")
    mimic_tree(root, ".jpg")
    run("mimic-cxr-jpg", "--root", root, "--out", out, "--size", S, "--mimic-iv", os.path.join(root, "mimiciv"))
    m = meta(out)
    assert sorted(m) == ["d1", "d2", "d4"]
    d1, d2, d4 = m["d1"], m["d2"], m["d4"]
    assert (d1["patient_id"], d1["study_id"], d1["split"], d1["view"], d1["sex"], d1["age"], d1["race"]) == \
        ("10000032", "50414267", "train", "PA", "F", "52", "WHITE")
    assert d2["view"] == "LATERAL" and d4["split"] == "test" and d4["race"] == "" and d4["age"] == "57"
    assert labels(d1) == {"Cardiomegaly": "1", "Edema": "-1", "Pleural Effusion": "0"} == labels(d2)
    assert labels(d4) == {"Support Devices": "1", "Pneumothorax": "-1"}
    assert d1["report"] == "Cardiomegaly with possible mild edema."
    assert d1["findings"] == "Heart is enlarged. Mild edema."
    assert d4["report"] == "" and d1["dataset"] == "MIMIC-CXR"
    assert summary(out)["skipped"] == {"missing image": 1}
    # JPEG pixels (8-bit, lossy): close to the min-max normalised source
    src = np.asarray(Image.open(os.path.join(root, "files/p10/p10000032/s50414267/d1.jpg")), np.float64)
    assert np.abs(pixels(out, d1) - ref_uint16(src)).max() <= 257
    # --views drops the lateral row and counts it; the age rule for a second patient: 86 + (2132 - 2132)
    out2 = str(tmp_path / "out2")
    run("mimic-cxr-jpg", "--root", root, "--out", out2, "--size", S, "--views", "PA,AP",
        "--mimic-iv", os.path.join(root, "mimiciv"))
    assert sorted(meta(out2)) == ["d1", "d4"] and summary(out2)["skipped"]["view not selected"] == 1


@needs_dicom
def test_mimic_cxr_dicom(tmp_path):
    root, out = str(tmp_path / "mimic"), str(tmp_path / "out")
    mimic_tree(root, ".dcm")
    metadir = str(tmp_path / "jpgcsv")
    os.makedirs(metadir)
    for f in os.listdir(root):
        if f.endswith(".csv.gz"):
            shutil.move(os.path.join(root, f), os.path.join(metadir, f))
    run("mimic-cxr", "--root", root, "--out", out, "--size", S, "--meta-dir", metadir)
    m = meta(out)
    assert sorted(m) == ["d1", "d2", "d4"] and m["d1"]["age"] == "" and m["d1"]["report"].startswith("Cardiomegaly")
    stored = ramp(S, S, 0, 255, seed=0).astype(np.int64) * 16
    assert np.abs(pixels(out, m["d1"]) - ref_uint16(stored)).max() <= 1
    with pytest.raises(SystemExit, match="metadata CSV"):                    # CSVs neither in --meta-dir nor ROOT
        run("mimic-cxr", "--root", root, "--out", str(tmp_path / "o3"), "--size", S)


CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                   "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def test_chexpert_with_plus(tmp_path):
    root, out = str(tmp_path / "CheXpert-v1.0"), str(tmp_path / "out")
    files = ["train/patient00001/study1/view1_frontal.jpg", "train/patient00001/study1/view2_lateral.jpg",
             "train/patient00002/study2/view1_frontal.jpg", "valid/patient64541/study1/view1_frontal.jpg"]
    for k, f in enumerate(files):
        os.makedirs(os.path.dirname(os.path.join(root, f)), exist_ok=True)
        Image.fromarray(ramp(40, S, 0, 255, seed=k).astype(np.uint8)).save(os.path.join(root, f))
    row = lambda f, sex, age, fl, ap, **kw: [f"CheXpert-v1.0/{f}", sex, age, fl, ap] + \
        [kw.get(c.replace(" ", "_"), "") for c in CHEXPERT_HEADER[5:]]
    write_csv(os.path.join(root, "train.csv"), CHEXPERT_HEADER,
              [row(files[0], "Female", "68", "Frontal", "AP", Cardiomegaly="1.0", Pleural_Effusion="-1.0",
                   No_Finding=""),
               row(files[1], "Female", "68", "Lateral", "", Cardiomegaly="1.0"),
               row(files[2], "Unknown", "0", "Frontal", "PA", No_Finding="1.0", Support_Devices="0.0")])
    write_csv(os.path.join(root, "valid.csv"), CHEXPERT_HEADER, [row(files[3], "Male", "73", "Frontal", "AP",
                                                                     Edema="1.0", Fracture="0.0")])
    write_csv(os.path.join(root, "df_chexpert_plus_240401.csv"),
              ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id", "report",
               "section_findings", "section_impression", "age", "sex", "race", "ethnicity", "split"],
              [[files[0], "", "Frontal", "AP", "patient00001", "r", "Enlarged heart.", "Cardiomegaly.", "68", "Female",
                "Black or African American", "", "train"],
               [files[2], "", "Frontal", "PA", "patient00002", "r", "", "Normal chest.", "41", "Male", "White", "",
                "train"]])
    run("chexpert", "--root", root, "--out", out, "--size", S)
    m = meta(out)
    a, lat, b, v = (m["train_patient00001_study1_view1_frontal"], m["train_patient00001_study1_view2_lateral"],
                    m["train_patient00002_study2_view1_frontal"], m["valid_patient64541_study1_view1_frontal"])
    assert (a["view"], a["sex"], a["age"], a["race"], a["report"], a["findings"]) == \
        ("AP", "F", "68", "BLACK", "Cardiomegaly.", "Enlarged heart.")
    assert labels(a) == {"Cardiomegaly": "1", "Pleural Effusion": "-1"} and lat["view"] == "LATERAL"
    assert (b["sex"], b["age"], b["race"], b["view"]) == ("M", "41", "WHITE", "PA")   # CheXpert-Plus fills gaps
    assert labels(b) == {"No Finding": "1", "Support Devices": "0"}
    assert (v["split"], v["patient_id"], a["split"], a["dataset"]) == ("val", "patient64541", "train", "CheXpert-Plus")
    # 40 x 32 source -> 32 x 26 content: 3 black columns left and right
    px = pixels(out, a)
    assert np.all(px[:, :3] == 0) and np.all(px[:, -3:] == 0) and px[:, 4:-4].min() >= 0
    assert_no_leak(m.values())


NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


def nih_tree(root):
    os.makedirs(os.path.join(root, "images_001", "images"))
    os.makedirs(os.path.join(root, "images_002", "images"))
    have_real = all(os.path.isfile(os.path.join(REAL, f)) for f in ("00000001_000.png", "00027426_000.png"))
    for f in ("00000001_000.png", "00027426_000.png"):
        if have_real:
            shutil.copy(os.path.join(REAL, f), os.path.join(root, "images_001", "images", f))
        else:
            Image.fromarray(ramp(64, 64, 0, 255).astype(np.uint8)).save(os.path.join(root, "images_001", "images", f))
    for k, f in enumerate(["00000002_000.png", "00000002_001.png", "00000003_000.png", "00000004_000.png"]):
        img = Image.fromarray(ramp(64, 64, 0, 255, seed=k).astype(np.uint8))
        img.save(os.path.join(root, "images_002", "images", f))
    (open(os.path.join(root, "images_002", "images", "00000005_000.png"), "wb")).write(b"\x89PNG\r\n\x1a\ntruncated")
    write_csv(os.path.join(root, "Data_Entry_2017_v2020.csv"), NIH_HEADER, [
        ["00000001_000.png", "Cardiomegaly", "0", "1", "58", "M", "PA", "2682", "2749", "0.143", "0.143"],
        ["00027426_000.png", "No Finding", "0", "27426", "045Y", "F", "PA", "2048", "2500", "0.168", "0.168"],
        ["00000002_000.png", "Effusion|Mass|Emphysema", "0", "2", "81", "F", "AP", "2500", "2048", "0.168", "0.168"],
        ["00000002_001.png", "Infiltration", "1", "2", "81", "F", "AP", "2500", "2048", "0.168", "0.168"],
        ["00000003_000.png", "Hernia", "0", "3", "412", "M", "PA", "2500", "2048", "0.168", "0.168"],
        ["00000004_000.png", "Unheard Of", "0", "4", "33", "M", "PA", "2500", "2048", "0.168", "0.168"],
        ["00000005_000.png", "No Finding", "0", "5", "33", "M", "PA", "2500", "2048", "0.168", "0.168"]])
    with open(os.path.join(root, "train_val_list.txt"), "w") as f:
        f.write("00000001_000.png\n00000002_000.png\n00000002_001.png\n00000003_000.png\n00000005_000.png\n")
    with open(os.path.join(root, "test_list.txt"), "w") as f:
        f.write("00027426_000.png\n00000004_000.png\n")
    return have_real


def test_nih_cxr14_real_pngs_mapping_and_corrupt(tmp_path):
    root, out = str(tmp_path / "nih"), str(tmp_path / "out")
    have_real = nih_tree(root)
    run("nih-cxr14", "--root", root, "--out", out, "--size", 64, "--val-frac", 0.5)
    m = meta(out)
    assert sorted(m) == ["00000001_000", "00000002_000", "00000002_001", "00000003_000", "00027426_000"]
    a, nf, e, i, h = (m[k] for k in ["00000001_000", "00027426_000", "00000002_000", "00000002_001", "00000003_000"])
    mapped = {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Lung Opacity",
              "Lung Lesion", "Pleural Other", "Pneumonia", "Pneumothorax"}
    assert labels(a) == {**{k: "0" for k in mapped}, "Cardiomegaly": "1", "No Finding": "0"}
    assert labels(nf) == {**{k: "0" for k in mapped}, "No Finding": "1"}
    # a Mass says nothing about Lung Opacity being absent: its parent is blank, never 0 (LABELS.md)
    assert labels(e) == {**{k: "0" for k in mapped - {"Lung Opacity"}}, "Pleural Effusion": "1", "Lung Lesion": "1",
                         "No Finding": "0"}
    assert labels(i)["Lung Opacity"] == "1" and labels(h) == {**{k: "0" for k in mapped}, "No Finding": "0"}
    assert (a["age"], a["sex"], a["view"], nf["age"], nf["split"], h["age"], a["dataset"]) == \
        ("58", "M", "PA", "45", "test", "", "ChestX-ray14")
    assert e["split"] == i["split"] and e["split"] in ("train", "val") and a["split"] in ("train", "val")
    assert all(labels(r).get(k) is None for r in m.values() for k in ("Fracture", "Support Devices",
                                                                       "Enlarged Cardiomediastinum"))
    sm = summary(out)
    assert sm["skipped"] == {"unknown label value": 1, "unreadable image": 1} and sm["read"] == 7
    assert sm["written"] == 5
    assert_no_leak(m.values())
    if have_real:   # 512 -> 64: each output pixel ~ the 8 x 8 block mean of the normalised radiograph
        src = np.asarray(Image.open(os.path.join(REAL, "00000001_000.png")).convert("L"), np.float64)
        ref = ref_uint16(src).reshape(64, 8, 64, 8).mean(axis=(1, 3))
        got = pixels(out, a)
        assert np.abs(got - ref).mean() < 0.01 * 65535 and np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.995


PADCHEST_HEADER = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
                   "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM",
                   "Manufacturer_DICOM", "PhotometricInterpretation_DICOM", "PixelRepresentation_DICOM",
                   "PixelAspectRatio_DICOM", "SpatialResolution_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM",
                   "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM",
                   "ExposureInuAs_DICOM", "ExposureTime", "RelativeXRayExposure_DICOM", "ReportID", "Report",
                   "MethodLabel", "Labels", "Localizations", "LabelsLocalizationsBySentence", "labelCUIS",
                   "LocalizationsCUIS"]


def test_padchest(tmp_path):
    root, out = str(tmp_path / "padchest"), str(tmp_path / "out")
    rows = [("111_a.png", "0", "20150603", "s1", "p1", "1950.0", "M", "PA", "['pleural effusion', 'cardiomegaly']"),
            ("111_b.png", "0", "20150603", "s1", "p1", "1950.0", "M", "L", "['normal']"),
            ("222_a.png", "1", "20120101", "s2", "p2", "1990.0", "F", "AP_horizontal",
             "['nsg tube', ' laminar atelectasis', 'scoliosis']"),
            ("333_a.png", "1", "20120101", "s3", "p3", "1800.0", "O", "PA", "['exclude']"),
            ("444_a.png", "1", "20120101", "s4", "p4", "", "F", "COSTAL", "['rib fracture']"),
            ("555_a.png", "1", "20120101", "s5", "p5", "1960.0", "F", "PA", "[broken")]
    for k, r in enumerate(rows):
        os.makedirs(os.path.join(root, r[1]), exist_ok=True)
        Image.fromarray(ramp(S, S, 300, 4000, seed=k).astype(np.uint16)).save(os.path.join(root, r[1], r[0]))
    blank = {c: "" for c in PADCHEST_HEADER}
    write_csv(os.path.join(root, "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"), PADCHEST_HEADER,
              [[{**blank, "ImageID": r[0], "ImageDir": r[1], "StudyDate_DICOM": r[2], "StudyID": r[3],
                 "PatientID": r[4], "PatientBirth": r[5], "PatientSex_DICOM": r[6], "Projection": r[7],
                 "Labels": r[8], "Report": "derrame pleural"}[c] for c in PADCHEST_HEADER] for r in rows])
    run("padchest", "--root", root, "--out", out, "--size", S)
    m = meta(out)
    assert sorted(m) == ["111_a", "111_b", "222_a", "444_a"]
    a, b, c, d = m["111_a"], m["111_b"], m["222_a"], m["444_a"]
    assert (a["age"], a["sex"], a["view"], b["view"], c["view"], d["view"], c["age"], d["age"]) == \
        ("65", "M", "PA", "LATERAL", "AP", "", "22", "")
    assert a["split"] == b["split"] and a["report"] == ""
    assert labels(a)["Pleural Effusion"] == "1" and labels(a)["Cardiomegaly"] == "1" and labels(a)["No Finding"] == "0"
    assert labels(a)["Pneumothorax"] == "0" and labels(b)["No Finding"] == "1" and labels(b)["Cardiomegaly"] == "0"
    assert labels(c)["Support Devices"] == "1" and labels(c)["Atelectasis"] == "1" and labels(c)["No Finding"] == "0"
    assert labels(d)["Fracture"] == "1"
    assert summary(out)["skipped"] == {"excluded by the source": 1, "unknown label value": 1}
    src = ramp(S, S, 300, 4000, seed=0)                      # 16-bit PNG using 12 bits -> stretched to 16
    assert np.abs(pixels(out, a) - ref_uint16(src)).max() <= 1
    assert_no_leak(m.values())


VINDR_FINDINGS = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                  "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                  "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
                  "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD",
                  "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]


@needs_dicom
def test_vindr_cxr_majority_vote_and_dicom_header(tmp_path):
    root, out = str(tmp_path / "vindr"), str(tmp_path / "out")
    s1 = ramp(S, S, 0, 4095, seed=1)
    write_dicom(os.path.join(root, "train", "aaa.dicom"), s1, "MONOCHROME1", bits=12, window=(1500, 2001),
                age="058Y", sex="F")
    write_dicom(os.path.join(root, "train", "bbb.dicom"), ramp(S, S, 0, 65535, seed=2), bits=16, age="", sex="O")
    write_dicom(os.path.join(root, "test", "ccc.dicom"), ramp(S, S, 0, 65535, seed=3), bits=16, age="130Y", sex="M")
    vote = lambda rad, **on: ["aaa", rad] + [on.get(f.replace(" ", "_").replace("/", "_"), 0) for f in VINDR_FINDINGS]
    write_csv(os.path.join(root, "annotations", "image_labels_train.csv"), ["image_id", "rad_id"] + VINDR_FINDINGS,
              [vote("R1", Cardiomegaly=1, Pleural_effusion=1), vote("R2", Cardiomegaly=1), vote("R3", Rib_fracture=1)]
              + [["bbb", r] + [0] * 27 + [1] for r in ("R4", "R5", "R6")])
    write_csv(os.path.join(root, "annotations", "image_labels_test.csv"), ["image_id"] + VINDR_FINDINGS,
              [["ccc"] + [1 if f in ("Nodule/Mass", "COPD") else 0 for f in VINDR_FINDINGS]])
    run("vindr-cxr", "--root", root, "--out", out, "--size", S)
    m = meta(out)
    a, b, c = m["aaa"], m["bbb"], m["ccc"]
    assert (a["age"], a["sex"], a["view"], b["age"], b["sex"], c["age"], c["sex"], c["split"]) == \
        ("58", "F", "PA", "", "", "", "M", "test")
    # 2 of 3 -> 1; 1 of 3 -> -1 (the readers disagree; LABELS.md "VinDr-CXR vote")
    assert labels(a)["Cardiomegaly"] == "1" and labels(a)["Pleural Effusion"] == "-1" and labels(a)["Fracture"] == "-1"
    assert labels(a)["No Finding"] == "0" and "Support Devices" not in labels(a) and "Pleural Other" in labels(a)
    assert labels(b)["No Finding"] == "1" and labels(b)["Cardiomegaly"] == "0"
    assert labels(c)["Lung Lesion"] == "1" and labels(c)["No Finding"] == "0"
    expect = ref_uint16(1.0 - ref_linear_window(s1.astype(np.float64), 1500.0, 2001.0))
    assert np.abs(pixels(out, a) - expect).max() <= 1


BRAX_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
               "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
               "Fracture", "Support Devices"]


@needs_dicom
def test_brax_dicom_then_png(tmp_path):
    root, out = str(tmp_path / "brax"), str(tmp_path / "out")
    d1 = "Anonymized_DICOMs/id_P1/Study_1.2/Series_1.2.3/image-1.2.3.4.dcm"
    p2 = "images/id_P2/Study_9/Series_9.1/image-9.1.1.png"
    s1 = ramp(S, S, 0, 4095, seed=5)
    write_dicom(os.path.join(root, d1), s1, bits=12, slope=1, intercept=0)
    os.makedirs(os.path.dirname(os.path.join(root, p2)))
    Image.fromarray(ramp(S, S, 0, 255, seed=6).astype(np.uint8)).save(os.path.join(root, p2))
    head = ["DicomPath", "PngPath", "PatientID", "PatientSex", "PatientAge", "AccessionNumber", "StudyDate",
            "ViewPosition", "Rows", "Columns", "Manufacturer"] + BRAX_LABELS
    lab = lambda **on: [on.get(k.replace(" ", "_"), "") for k in BRAX_LABELS]
    write_csv(os.path.join(root, "master_spreadsheet_update.csv"), head,
              [[d1, d1.replace("Anonymized_DICOMs", "images")[:-4] + ".png", "P1", "M", "85 or more", "A1", "2010",
                "PA", S, S, 1] + lab(Cardiomegaly="1", Edema="-1", No_Finding="0"),
               ["", p2, "P2", "F", "40-44", "A2", "2011", "LL", S, S, 2] + lab(No_Finding="1")])
    run("brax", "--root", root, "--out", out, "--size", S)
    m = meta(out)
    a, b = m["image-1.2.3.4"], m["image-9.1.1"]
    assert (a["age"], a["sex"], a["view"], b["age"], b["sex"], b["view"]) == ("85", "M", "PA", "42.5", "F", "LATERAL")
    assert labels(a) == {"Cardiomegaly": "1", "Edema": "-1", "No Finding": "0"} and labels(b) == {"No Finding": "1"}
    assert np.abs(pixels(out, a) - ref_uint16(s1)).max() <= 1                # the DICOM, not the (absent) PNG


def test_rexgradient(tmp_path):
    root, out = str(tmp_path / "rex"), str(tmp_path / "out")
    entries = {}
    for split, n in (("train", 2), ("valid", 1), ("test", 1)):
        data = {}
        for k in range(n):
            pid = f"GRDN{split}{k}"
            paths = [f"../deid_png/{pid}/studies/S{k}/series/X/instances/I{split}{k}{j}.png" for j in range(2)]
            for j, p in enumerate(paths):
                full = os.path.normpath(os.path.join(root, "metadata", p))
                os.makedirs(os.path.dirname(full), exist_ok=True)
                Image.fromarray(ramp(S, S, 0, 255, seed=k + j).astype(np.uint8)).save(full)
            data[f"{pid}_S{k}"] = {"PatientID": pid, "StudyInstanceUid": f"S{split}{k}", "AccessionNumber": "x",
                                   "PatientSex": "F", "PatientAge": "061Y", "StudyDate": "20200101",
                                   "Indication": "cough", "Comparison": "None", "Findings": "Clear lungs.",
                                   "Impression": "No acute process.", "ImagePath": paths,
                                   "ImageViewPosition": ["PA", "LATERAL"]}
        entries[split] = data
        os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
        with open(os.path.join(root, "metadata", f"{split}_metadata_view_position.json"), "w") as f:
            json.dump(data, f)
    run("rexgradient", "--root", root, "--out", out, "--size", S)
    m = meta(out)
    assert len(m) == 8
    r = m["Itrain00"]
    assert (r["patient_id"], r["study_id"], r["split"], r["view"], r["sex"], r["age"], r["report"], r["findings"]) == \
        ("GRDNtrain0", "Strain0", "train", "PA", "F", "61", "No acute process.", "Clear lungs.")
    assert m["Itrain01"]["view"] == "LATERAL" and m["Ivalid00"]["split"] == "val" and m["Itest01"]["split"] == "test"
    assert labels(r) == {}


def generic_tree(root, rows, dataset="Custom"):
    for r in rows:
        os.makedirs(os.path.dirname(os.path.join(root, r["path"])), exist_ok=True)
        Image.fromarray(ramp(S, S, 0, 255, seed=len(r["path"])).astype(np.uint8)).save(os.path.join(root, r["path"]))
    cols = sorted({k for r in rows for k in r})
    write_csv(os.path.join(root, "meta.csv"), cols, [[r.get(c, "") for c in cols] for r in rows])


def test_generic_resume_and_bad_column(tmp_path):
    root, out = str(tmp_path / "gen"), str(tmp_path / "out")
    rows = [{"path": f"img/{i}.png", "patient_id": f"p{i // 2}", "sex": "female" if i % 2 else "M", "age": str(20 + i),
             "view": "PA", "Cardiomegaly": "1" if i == 0 else "0", "race": "white"} for i in range(6)]
    rows[5]["split"] = "test"                                # patient p2 also has row 4 (no split): both -> test
    rows.append({**rows[0], "path": "img/x.png", "patient_id": "px", "Cardiomegaly": "yes"})   # unknown value
    generic_tree(root, rows)
    run("generic", "--root", root, "--out", out, "--size", S, "--shard-size", 2, "--dataset-name", "Custom")
    m = meta(out)
    assert len(m) == 6 and m["0"]["Cardiomegaly"] == "1" and m["1"]["sex"] == "F" and m["1"]["race"] == "WHITE"
    assert m["4"]["split"] == m["5"]["split"] == "test" and m["0"]["dataset"] == "Custom"
    assert summary(out)["notes"] == {"rows moved to keep a patient in one split": 1}
    assert summary(out)["skipped"] == {"unknown label value": 1}
    assert_no_leak(m.values())
    # resume: shards 0 and 2 finished, shard 1 lost its rows (as after a kill): only shard 1 is rewritten
    t0 = os.stat(os.path.join(out, "shards", "00000.safetensors")).st_mtime_ns
    for f in ("shards/00001.csv", "meta.csv", "info.json"):
        os.remove(os.path.join(out, f))
    run("generic", "--root", root, "--out", out, "--size", S, "--shard-size", 2, "--dataset-name", "Custom")
    assert meta(out) == m and os.stat(os.path.join(out, "shards", "00000.safetensors")).st_mtime_ns == t0
    # another dataset into the same folder is refused; a CSV without a required column is a one-line error
    with pytest.raises(SystemExit, match="different dataset"):
        run("generic", "--root", root, "--out", out, "--size", 64, "--dataset-name", "Custom")
    write_csv(os.path.join(root, "bad.csv"), ["file", "sex"], [["img/0.png", "F"]])
    with pytest.raises(SystemExit, match=r"bad\.csv: missing column 'path'"):
        run("generic", "--root", root, "--csv", os.path.join(root, "bad.csv"), "--out", str(tmp_path / "o2"))


def test_bad_columns_name_file_and_column(tmp_path):
    root = str(tmp_path / "nih")
    nih_tree(root)
    path = os.path.join(root, "Data_Entry_2017_v2020.csv")
    with open(path) as f:
        text = f.read().replace("Patient Gender", "Gender")
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(SystemExit, match=r"Data_Entry_2017_v2020\.csv: missing column 'Patient Gender'"):
        run("nih-cxr14", "--root", root, "--out", str(tmp_path / "o"))
    with pytest.raises(SystemExit, match="no PadChest labels CSV"):
        run("padchest", "--root", root, "--out", str(tmp_path / "o"))

# ----------------------------------------------------------------------------------------------------------------
# Merge


def test_merge_renumbers_shards_and_keeps_patients_in_one_split(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    rows_a = [{"path": f"x/{i}.png", "id": f"a{i}", "patient_id": f"p{i}", "split": "train",
               "Edema": "1" if i < 2 else "0"} for i in range(5)]
    rows_b = [{"path": f"y/{i}.png", "id": f"b{i}", "patient_id": f"p{i}", "split": "test", "Edema": "0"}
              for i in range(3)]
    generic_tree(str(tmp_path / "ra"), rows_a)
    generic_tree(str(tmp_path / "rb"), rows_b)
    run("generic", "--root", tmp_path / "ra", "--out", a, "--size", S, "--shard-size", 2, "--dataset-name", "Same")
    run("generic", "--root", tmp_path / "rb", "--out", b, "--size", S, "--shard-size", 2, "--dataset-name", "Same")
    run("generic", "--root", tmp_path / "rb", "--out", c, "--size", S, "--dataset-name", "Other")
    out = str(tmp_path / "m")
    with pytest.raises(SystemExit, match="already in an earlier input"):     # b and c hold the same ids
        run("merge", "--inputs", a, b, c, "--out", out)
    assert not os.path.exists(out)                                           # a refused merge leaves nothing
    run("merge", "--inputs", a, b, "--out", out)
    m = meta(out)
    info = json.load(open(os.path.join(out, "info.json")))
    assert len(m) == 8 and info["datasets"] == ["Same"] and sorted({int(r["shard"]) for r in m.values()}) == \
        list(range(5))
    # patients p0..p2 are in train in a and in test in b: all their rows go to test (a's p3, p4 stay in train)
    assert [m[f"a{i}"]["split"] for i in range(5)] == ["test"] * 3 + ["train"] * 2
    assert info["rows_moved_for_patient_split"] == 3 and info["counts"] == {"train": 2, "val": 0, "test": 6}
    assert info["prevalence"]["test"]["Edema"]["pos"] == 2 and info["prevalence"]["train"]["Edema"]["neg"] == 2
    assert_no_leak(m.values())
    ma, mb = meta(a), meta(b)                                # pixels unchanged through the renumbering
    for src, rows in ((a, ma), (b, mb)):
        for k, r in rows.items():
            assert np.array_equal(pixels(out, m[k]), pixels(src, r))
    # two different dataset names keep their order (codes 1, 2) and per-dataset tables
    out2 = str(tmp_path / "m2")
    run("merge", "--inputs", a, c, "--out", out2)
    info2 = json.load(open(os.path.join(out2, "info.json")))
    assert info2["datasets"] == ["Same", "Other"] and info2["counts_by_dataset"] == {"Same": 5, "Other": 3}
    assert info2["rows_moved_for_patient_split"] == 0                  # same patient ids, different datasets
    assert P.csv_to_codes(meta(out2)["b0"], info2["datasets"])["dataset"] == 2


def test_workers_and_png16_give_the_same_dataset(tmp_path):
    root = str(tmp_path / "gen")
    generic_tree(root, [{"path": f"i/{i}.png", "sex": "F", "Edema": str(i % 2)} for i in range(5)])
    outs = [str(tmp_path / f"o{w}") for w in (1, 2)]
    for w, out in zip((1, 2), outs):
        run("generic", "--root", root, "--out", out, "--size", S, "--shard-size", 2, "--workers", w, "--png16")
    m1, m2 = meta(outs[0]), meta(outs[1])
    assert m1 == m2 and len(m1) == 5 and not any(f.startswith(".records") for f in os.listdir(outs[1]))
    for k, r in m1.items():
        png = np.asarray(Image.open(os.path.join(outs[1], "png", k + ".png")), np.float64)
        assert np.array_equal(pixels(outs[0], r), pixels(outs[1], m2[k])) and np.array_equal(png, pixels(outs[0], r))

# ----------------------------------------------------------------------------------------------------------------
# Issue 22: votes per CheXpert label, "not mentioned" is not "negative", and the layout details (LABELS.md)

LUNG_OPACITY_CHILDREN = ["Consolidation", "Atelectasis", "Edema", "Lung Lesion", "Pneumonia"]


def assert_parent_rule(rows):
    """No row says 'no lung opacity' (or 'no enlarged cardiomediastinum') while one of its children is present."""
    for r in rows:
        if any(r[k] in ("1", "-1") for k in LUNG_OPACITY_CHILDREN):
            assert r["Lung Opacity"] != "0", (r["id"], labels(r))
        if r["Cardiomegaly"] in ("1", "-1"):
            assert r["Enlarged Cardiomediastinum"] != "0", (r["id"], labels(r))


@needs_dicom
def test_vindr_cxr_votes_per_chexpert_label_after_mapping(tmp_path):
    root, out = str(tmp_path / "vindr"), str(tmp_path / "out")
    readers = {   # image: the findings each of its 3 radiologists marked (VinDr column names)
        "lesion": [["Nodule/Mass"], ["Lung tumor"], ["Pleural effusion"]],        # 2 of 3 report a lung lesion
        "fracture": [["Rib fracture"], ["Clavicle fracture"], ["No finding"]],    # 2 of 3 report a fracture
        "minority": [["Pleural effusion"], ["No finding"], ["No finding"]],      # 1 of 3: uncertain
        "aorta": [["Aortic enlargement"], ["Aortic enlargement"], ["Aortic enlargement", "Cardiomegaly"]],
        "cons": [["Consolidation"], ["Consolidation", "Infiltration"], ["Calcification"]],
        "normal": [["No finding"], ["No finding"], ["Other lesion"]]}
    rows = []
    for k, (image, marks) in enumerate(readers.items()):
        write_dicom(os.path.join(root, "train", image + ".dicom"), ramp(S, S, 0, 4095, seed=k), bits=12,
                    age="040Y", sex="M")
        rows += [[image, f"R{j + 1}"] + [int(f in m) for f in VINDR_FINDINGS] for j, m in enumerate(marks)]
    write_csv(os.path.join(root, "annotations", "image_labels_train.csv"), ["image_id", "rad_id"] + VINDR_FINDINGS,
              rows)
    write_dicom(os.path.join(root, "test", "t1.dicom"), ramp(S, S, 0, 4095, seed=9), bits=12, age="040Y", sex="F")
    write_csv(os.path.join(root, "annotations", "image_labels_test.csv"), ["image_id"] + VINDR_FINDINGS,
              [["t1"] + [int(f == "Atelectasis") for f in VINDR_FINDINGS],           # consensus: one row
               ["t2"] + [2 if f == "Atelectasis" else 0 for f in VINDR_FINDINGS]])     # not a 0/1 value
    run("vindr-cxr", "--root", root, "--out", out, "--size", S)
    m = meta(out)
    assert "t2" not in m and summary(out)["skipped"] == {"unknown label value": 1}
    # VinDr's vocabulary covers these 11 labels; Enlarged Cardiomediastinum and Support Devices are never assessed
    zeros = {k: "0" for k in ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Fracture", "Lung Lesion",
                              "Lung Opacity", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax"]}
    no_opacity = {k: v for k, v in zeros.items() if k != "Lung Opacity"}      # parent of a positive child: blank
    assert labels(m["lesion"]) == {**no_opacity, "Lung Lesion": "1", "Pleural Effusion": "-1", "No Finding": "0"}
    assert labels(m["fracture"]) == {**zeros, "Fracture": "1", "No Finding": "0"}
    assert labels(m["minority"]) == {**zeros, "Pleural Effusion": "-1", "No Finding": "-1"}
    # aortic enlargement is not Enlarged Cardiomediastinum (as PadChest's aortic elongation); Cardiomegaly 1 of 3
    assert labels(m["aorta"]) == {**zeros, "Cardiomegaly": "-1", "No Finding": "0"}
    cons = labels(m["cons"])                          # Consolidation 2/3, Lung Opacity 1/3 (Infiltration)
    assert cons == {**zeros, "Consolidation": "1", "Lung Opacity": "-1", "No Finding": "0"}
    assert labels(m["normal"]) == {**zeros, "No Finding": "1"}
    assert labels(m["t1"]) == {**no_opacity, "Atelectasis": "1", "No Finding": "0"}
    assert all(r["Enlarged Cardiomediastinum"] == "" and r["Support Devices"] == "" for r in m.values())
    assert_parent_rule(m.values())


# the 20 most frequent 'Finding Labels' values of the real Data_Entry_2017.csv that hold a Lung Opacity child,
# then common ones without (first 40,000 rows of the real file)
NIH_REAL_COMBOS = ["Atelectasis", "Nodule", "Mass", "Atelectasis|Infiltration", "Consolidation", "Atelectasis|Effusion",
                   "Infiltration|Nodule", "Atelectasis|Effusion|Infiltration", "Edema", "Consolidation|Infiltration",
                   "Atelectasis|Consolidation", "Infiltration|Mass", "Edema|Infiltration", "Pneumonia", "Mass|Nodule",
                   "Consolidation|Effusion", "Effusion|Mass", "Atelectasis|Pneumothorax", "Effusion|Nodule",
                   "Infiltration|Pneumonia", "No Finding", "Infiltration", "Effusion", "Pneumothorax", "Cardiomegaly",
                   "Cardiomegaly|Effusion", "Emphysema", "Hernia|Fibrosis"]


def test_nih_parent_of_a_positive_child_is_never_zero(tmp_path):
    root, out = str(tmp_path / "nih"), str(tmp_path / "out")
    os.makedirs(os.path.join(root, "images_003", "images"))
    rows = []
    for k, combo in enumerate(NIH_REAL_COMBOS):
        name = f"{k + 1:08d}_000.png"
        Image.fromarray(ramp(S, S, 0, 255, seed=k).astype(np.uint8)).save(os.path.join(root, "images_003", "images",
                                                                                        name))
        rows.append([name, combo, "0", str(k + 1), "060Y", "F", "PA", "2500", "2048", "0.168", "0.168"])
    write_csv(os.path.join(root, "Data_Entry_2017_v2020.csv"), NIH_HEADER, rows)
    run("nih-cxr14", "--root", root, "--out", out, "--size", S)
    m = meta(out)
    assert len(m) == len(NIH_REAL_COMBOS)
    assert_parent_rule(m.values())
    kids = [r for r in m.values() if any(r[k] == "1" for k in LUNG_OPACITY_CHILDREN)]
    assert len(kids) == 20 and sum(r["Lung Opacity"] == "0" for r in kids) == 0       # was 17 of 20
    by_combo = {c: m[f"{k + 1:08d}_000"] for k, c in enumerate(NIH_REAL_COMBOS)}
    assert by_combo["Atelectasis"]["Lung Opacity"] == "" and by_combo["Atelectasis|Infiltration"]["Lung Opacity"] == "1"
    assert by_combo["Effusion"]["Lung Opacity"] == "0" and by_combo["No Finding"]["Lung Opacity"] == "0"
    # NIH looks for its 14 findings in every report: an unnamed, mapped finding is 0, as before
    assert by_combo["Atelectasis"]["Pneumothorax"] == "0" and by_combo["Emphysema"]["No Finding"] == "0"
    assert all(r["Enlarged Cardiomediastinum"] == "" for r in m.values())            # never assessed by NIH


PADCHEST_CASES = [   # (Labels as in the CSV, expected labels (only those stated), PhotometricInterpretation_DICOM)
    ("['hydropneumothorax']", {"Pleural Effusion": "1", "Pneumothorax": "1", "No Finding": "0"}, "MONOCHROME2"),
    ("['dai', 'cardiomegaly']", {"Support Devices": "1", "Cardiomegaly": "1"}, ""),
    ("['osteosynthesis material']", {"Support Devices": "1", "No Finding": "0", "Fracture": "0"}, ""),
    ("['endoprosthesis']", {"Support Devices": "1"}, ""),
    ("['aortic endoprosthesis']", {"Support Devices": "1"}, ""),
    ("['gastrostomy tube']", {"Support Devices": "1"}, ""),
    ("['nephrostomy tube']", {"Support Devices": "1"}, ""),
    ("['heart insufficiency']", {"Edema": "1", "Cardiomegaly": "-1", "Lung Opacity": "", "No Finding": "0"}, ""),
    ("['heart insufficiency', 'cardiomegaly']", {"Edema": "1", "Cardiomegaly": "1"}, ""),
    ("['pseudonodule']", {"Lung Lesion": "0", "No Finding": "0"}, ""),
    ("['aortic elongation']", {"Enlarged Cardiomediastinum": "", "Cardiomegaly": "0", "No Finding": "0"}, ""),
    ("['aortic button enlargement']", {"Enlarged Cardiomediastinum": "", "No Finding": "0"}, ""),
    ("['cardiomegaly', 'nodule']", {"Enlarged Cardiomediastinum": "", "Lung Opacity": "", "Lung Lesion": "1"}, ""),
    ("['sternotomy']", {"Support Devices": "", "No Finding": "0"}, ""),
    ("['normal']", {"No Finding": "1", "Lung Opacity": "0", "Enlarged Cardiomediastinum": "0",
                    "Support Devices": "0"}, "MONOCHROME1"),
    ("['']", {}, ""),
    ("['suboptimal study']", {}, ""),
    ("['unchanged']", {}, ""),
    ("[]", {}, ""),
    ("['suboptimal study', 'pleural effusion']", {"Pleural Effusion": "1", "Pneumothorax": "0"}, "")]


def test_padchest_mappings_unread_studies_and_monochrome1(tmp_path):
    root, out = str(tmp_path / "padchest"), str(tmp_path / "out")
    blank = {c: "" for c in PADCHEST_HEADER}
    rows = []
    for k, (text, _, photometric) in enumerate(PADCHEST_CASES):
        image = f"{k:03d}_x.png"
        os.makedirs(os.path.join(root, "7"), exist_ok=True)
        Image.fromarray(ramp(S, S, 300, 4000, seed=k).astype(np.uint16)).save(os.path.join(root, "7", image))
        rows.append([{**blank, "ImageID": image, "ImageDir": "7", "StudyDate_DICOM": "20150603", "StudyID": f"s{k}",
                      "PatientID": f"p{k}", "PatientBirth": "1950.0", "PatientSex_DICOM": "F", "Projection": "PA",
                      "PhotometricInterpretation_DICOM": photometric, "Labels": text}[c] for c in PADCHEST_HEADER])
    write_csv(os.path.join(root, "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"), PADCHEST_HEADER, rows)
    run("padchest", "--root", root, "--out", out, "--size", S)
    m = meta(out)
    for k, (text, expect, _) in enumerate(PADCHEST_CASES):
        got = {lab: m[f"{k:03d}_x"][lab] for lab in P.LABELS}
        assert {lab: got[lab] for lab in expect} == expect, (text, labels(m[f"{k:03d}_x"]))
        if not expect:                                     # nothing was read: blank everywhere
            assert labels(m[f"{k:03d}_x"]) == {}, text
    assert_parent_rule(m.values())
    # MONOCHROME1 (stored: higher = darker) is inverted; MONOCHROME2 and an empty column are kept
    for k in (0, 1, 14):
        photometric = PADCHEST_CASES[k][2]
        src = ramp(S, S, 300, 4000, seed=k).astype(np.float64)
        expect = ref_uint16(-src if photometric == "MONOCHROME1" else src)
        assert np.abs(pixels(out, m[f"{k:03d}_x"]) - expect).max() <= 1, photometric


def test_rexgradient_json_nan_is_an_empty_text(tmp_path):
    root, out = str(tmp_path / "rex"), str(tmp_path / "out")
    meta_dir = os.path.join(root, "metadata")
    data = {}
    for k, (imp, fnd) in enumerate([(float("nan"), float("nan")), ("No acute process.", None)]):
        rel = f"../deid_png/GRDN{k}/studies/S{k}/series/X/instances/I{k}.png"
        full = os.path.normpath(os.path.join(meta_dir, rel))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        Image.fromarray(ramp(S, S, 0, 255, seed=k).astype(np.uint8)).save(full)
        data[f"GRDN{k}_S{k}"] = {"PatientID": f"GRDN{k}", "StudyInstanceUid": f"S{k}", "AccessionNumber": "x",
                                 "PatientSex": float("nan") if k == 0 else "M", "PatientAge": float("nan"),
                                 "StudyDate": "20200101", "Indication": float("nan"), "Comparison": "None",
                                 "Findings": fnd, "Impression": imp, "ImagePath": [rel], "ImageViewPosition": ["PA"]}
    os.makedirs(meta_dir, exist_ok=True)
    with open(os.path.join(meta_dir, "train_metadata_view_position.json"), "w") as f:
        json.dump(data, f)                              # Python writes NaN as the bare token NaN, as the release has
    assert "NaN" in open(os.path.join(meta_dir, "train_metadata_view_position.json")).read()
    run("rexgradient", "--root", root, "--out", out, "--size", S)
    m = meta(out)
    assert (m["I0"]["report"], m["I0"]["findings"], m["I0"]["sex"], m["I0"]["age"]) == ("", "", "", "")
    assert (m["I1"]["report"], m["I1"]["findings"], m["I1"]["sex"]) == ("No acute process.", "", "M")
    run("describe", "--data", out, "--only-missing")   # an empty report is missing: describe writes one
    d = meta(out)
    assert d["I0"]["report"] not in ("", "nan") and d["I1"]["report"] == "No acute process."


def test_chexpert_frontal_with_a_lateral_ap_pa_has_no_view(tmp_path):
    root, out = str(tmp_path / "CheXpert-v1.0"), str(tmp_path / "out")
    cases = [("Frontal", "LL", ""), ("Frontal", "RL", ""), ("Frontal", "PA", "PA"), ("Frontal", "AP", "AP"),
             ("Lateral", "", "LATERAL"), ("Frontal", "", "")]
    rows = []
    for k, (fl, ap, _) in enumerate(cases):
        f = f"train/patient0000{k}/study1/view1_{fl.lower()}.jpg"
        os.makedirs(os.path.dirname(os.path.join(root, f)), exist_ok=True)
        Image.fromarray(ramp(S, S, 0, 255, seed=k).astype(np.uint8)).save(os.path.join(root, f))
        rows.append([f"CheXpert-v1.0/{f}", "Female", "50", fl, ap] + [""] * 14)
    write_csv(os.path.join(root, "train.csv"), CHEXPERT_HEADER, rows)
    write_csv(os.path.join(root, "valid.csv"), CHEXPERT_HEADER, [])
    run("chexpert", "--root", root, "--out", out, "--size", S)
    m = meta(out)
    got = [m[f"train_patient0000{k}_study1_view1_{fl.lower()}"]["view"] for k, (fl, _, _) in enumerate(cases)]
    assert got == [view for _, _, view in cases]


def test_mimic_iv_anchor_age_over_89_is_capped(tmp_path):
    root, out = str(tmp_path / "mimic"), str(tmp_path / "out")
    mimic_tree(root, ".jpg")
    # d1's study is in 2180, d4's in 2145: anchor_age 91 ("over 89") gets no years added; 88 + 2 = 90 is over 89 too
    write_csv(os.path.join(root, "mimiciv", "hosp", "patients.csv.gz"),
              ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
              [["10000032", "F", "91", "2175", "2014 - 2016", ""], ["10000764", "M", "86", "2132", "2014 - 2016", ""],
               ["19999987", "F", "88", "2143", "2011 - 2013", ""]], gz=True)
    run("mimic-cxr-jpg", "--root", root, "--out", out, "--size", S, "--mimic-iv", os.path.join(root, "mimiciv"))
    m = meta(out)
    assert (m["d1"]["age"], m["d2"]["age"], m["d4"]["age"]) == ("91", "91", "91")
    assert P.MIMIC_OVER_89 == 91


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_shard_files_get_the_mode_of_the_csv(tmp_path, monkeypatch, umask):
    monkeypatch.setattr(P, "_UMASK", umask)
    old = os.umask(umask)
    try:
        for name in ("a", "b"):
            generic_tree(str(tmp_path / ("r" + name)), [{"path": f"{name}/{i}.png", "id": f"{name}{i}"}
                                                         for i in range(3)])
            run("generic", "--root", tmp_path / ("r" + name), "--out", tmp_path / name, "--size", S,
                "--shard-size", 2, "--png16")
        run("merge", "--inputs", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "m")     # hard links
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("cross-device")))
        run("merge", "--inputs", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "c")     # copies
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for d in "abmc":
        files = [os.path.join(tmp_path, d, f) for f in ("meta.csv", "info.json")]
        files += glob.glob(os.path.join(tmp_path, d, "shards", "*")) + glob.glob(os.path.join(tmp_path, d, "png", "*"))
        assert len(files) >= 4
        assert {f: oct(os.stat(f).st_mode & 0o777) for f in files} == {f: oct(want) for f in files}
    assert os.stat(os.path.join(tmp_path, "m", "shards", "00000.safetensors")).st_ino == \
        os.stat(os.path.join(tmp_path, "a", "shards", "00000.safetensors")).st_ino


def test_failed_merge_leaves_nothing_and_a_killed_one_finishes(tmp_path, monkeypatch):
    names = ("a", "b")
    for name in names:
        generic_tree(str(tmp_path / ("r" + name)), [{"path": f"{name}/{i}.png", "id": f"{name}{i}"} for i in range(3)])
        run("generic", "--root", tmp_path / ("r" + name), "--out", tmp_path / name, "--size", S, "--shard-size", 2)
    run("generic", "--root", tmp_path / "rb", "--out", tmp_path / "b2", "--size", S, "--dataset-name", "Again")
    a, b, b2 = (str(tmp_path / n) for n in ("a", "b", "b2"))
    out = str(tmp_path / "m")
    with pytest.raises(SystemExit, match=r"b2/meta\.csv: id 'b0' is already in an earlier input"):
        run("merge", "--inputs", a, b, b2, "--out", out)
    assert not os.path.exists(out)
    os.makedirs(out)                                         # an existing empty folder stays empty
    with pytest.raises(SystemExit, match="already in an earlier input"):
        run("merge", "--inputs", a, b, b2, "--out", out)
    assert os.listdir(out) == []
    calls = []                                               # a failure while linking: what was linked is removed

    def failing(src, dst, real=P._link_or_copy):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk full")
        real(src, dst)
    monkeypatch.setattr(P, "_link_or_copy", failing)
    with pytest.raises(OSError, match="disk full"):
        P.merge_datasets([a, b], out)
    assert os.listdir(os.path.join(out, "shards")) == []
    monkeypatch.undo()
    # a merge killed while linking (shards, no meta.csv; here with a stale shard of a larger merge): rerun finishes
    for s in (0, 1, 9):
        os.link(os.path.join(b, "shards", "00000.safetensors"), os.path.join(out, "shards", f"{s:05d}.safetensors"))
    run("merge", "--inputs", a, b, "--out", out)
    m = meta(out)
    assert sorted(os.listdir(os.path.join(out, "shards"))) == [f"{s:05d}.safetensors" for s in range(4)]
    for src in (a, b):
        for k, r in meta(src).items():
            assert np.array_equal(pixels(out, m[k]), pixels(src, r))
    # an unfinished prepare run is never merged into
    os.remove(os.path.join(b2, "meta.csv"))
    with pytest.raises(SystemExit, match="unfinished prepare run"):
        run("merge", "--inputs", a, b, "--out", b2)

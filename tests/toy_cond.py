"""A 2-class toy dataset in the FORMAT.md layout where the condition fully determines the image (issue 28, item 3).

Class 1 ("Cardiomegaly", male, "The heart is enlarged.") is a bright disk in the image's LEFT half; class 0
("No Finding", female, "No acute cardiopulmonary abnormality.") the same disk in the RIGHT half. Every other
variable is one constant value (PA view, age 60, WHITE, phantom-a, other findings negative), so each
conditional script's condition (metadata, labels, report, or the disk's mask in the `Heart` mask channel) is the
only thing that tells the two classes apart, and a sample's class is read exactly by `toy_class` (which half is
brighter). A model that ignores its condition draws each class half of the time; one that obeys draws the
requested class every time.

Rows alternate class 1, 0, 1, 0, ...; splits are the phantom's (`prep_data.phantom_split`). Pixels: background
0.2, disk 0.9 (radius size / 5, centred at (size / 4 or 3 size / 4, size / 2)), plus Gaussian noise of sd 0.02
(our choice: enough that no two images are identical, far below the disk's contrast).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))     # the repository root: prep_data
import prep_data  # noqa: E402

REPORTS = {1: "The heart is enlarged. Cardiomegaly.", 0: "No acute cardiopulmonary abnormality. No finding."}
CLASS_VALUES = {1: {"Cardiomegaly": "1", "No Finding": "0", "sex": "M"},        # what each class is asked as
                0: {"Cardiomegaly": "0", "No Finding": "1", "sex": "F"}}
CONSTANT = {"view": "PA", "age": "60", "race": "WHITE", "dataset": prep_data.PHANTOM_SOURCES[0]}


def toy_disk(size, cls):
    """[size, size] bool: the disk of class `cls` (1: left half, 0: right half)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cx = size / 4 if cls == 1 else 3 * size / 4
    return (xx - cx) ** 2 + (yy - size / 2) ** 2 <= (size / 5) ** 2


def toy_class(images):
    """Class of each image [N, 1, S, S] or [N, S, S] (any range): 1 where the left half is brighter than the right."""
    x = np.asarray(images, np.float64).reshape(len(images), images.shape[-2], images.shape[-1])
    half = x.shape[-1] // 2
    return (x[:, :, :half].mean((1, 2)) > x[:, :, half:].mean((1, 2))).astype(np.int64)


def toy_row(cls):
    """The meta.csv values (FORMAT.md §2) that class `cls` stands for; other variables constant."""
    row = {lab: "0" for lab in prep_data.LABELS}
    row.update(CONSTANT)
    row.update(CLASS_VALUES[cls])
    row["report"] = REPORTS[cls]
    row["findings"] = "PA view of the chest. " + row["report"]
    return row


def make_toy2(out, n=128, size=32, seed=0):
    """Write the toy dataset to `out` (one shard); -> its rows. Masks: `Heart` holds the disk, others empty."""
    rng = np.random.default_rng(seed)
    seeds = seed * 10_000_000 + np.arange(n, dtype=np.int64)
    splits = prep_data.phantom_split(seeds)
    images = np.zeros((n, 1, size, size), np.uint16)
    masks = np.zeros((n, len(prep_data.MASK_NAMES), size, size), np.uint8)
    heart = prep_data.MASK_NAMES.index("Heart")
    rows = []
    for i in range(n):
        cls = 1 - i % 2
        disk = toy_disk(size, cls)
        x = np.where(disk, 0.9, 0.2) + rng.normal(0.0, 0.02, (size, size))
        images[i, 0] = np.round(np.clip(x, 0.0, 1.0) * 65535).astype(np.uint16)
        masks[i, heart] = disk
        row = {"id": f"toy{i:06d}", "patient_id": f"tp{i:06d}", "study_id": f"ts{i:06d}", "split": str(splits[i]),
               "source_path": f"toy:{i}", "seed": str(int(seeds[i])), "laterality": "{}", "severity": "{}",
               "boxes": json.dumps({"Cardiomegaly": prep_data._bbox(disk)} if cls else {}),
               "shard": 0, "index": i, **toy_row(cls)}
        rows.append(row)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    columns = prep_data.META_COLUMNS + prep_data.PHANTOM_COLUMNS
    prep_data.write_shard(out, 0, {"images": images, "masks": masks}, rows, columns)
    info = prep_data.dataset_info(rows, size, prep_data.PHANTOM_SOURCES, prep_data.MASK_NAMES,
                                  {"kind": "toy2", "seed": seed})
    prep_data.write_dataset(out, rows, columns, info)
    return rows


if __name__ == "__main__":          # python tests/toy_cond.py OUT [N] [SIZE]: the dataset for a look or a run
    make_toy2(sys.argv[1], *(int(a) for a in sys.argv[2:4]))

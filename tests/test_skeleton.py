"""The training skeleton's promises, one test per promise, parametrised over the seven training loops: SIGTERM
saves a checkpoint that resumes to the losses of the uninterrupted run; a non-finite loss stops the run with the step
named and the last good checkpoint intact; a resumed run reproduces the uninterrupted one. Reduced tiny models on
the 32 px phantom of conftest.py, one thread, a few steps each. Then the copies of the skeleton: tests/check_copies.py
against tests/skeleton_reference.py, and the canonical pieces themselves.

The reference is always an independent uninterrupted run of the same script and settings in this process (one
thread, same CPU, same order): the losses and weights are bit-identical, so they are compared exactly."""
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

import check_copies                              # tests/ is on sys.path (pytest puts this file's folder there)
import controlnet
import dit_text2img
import downstream
import flow_scm
import ldm_multicond
import rectified_flow
import skeleton_reference
import vae
from tiny_text import phantom_texts, write_tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS3 = "Cardiomegaly,Pleural Effusion,Pneumothorax"
DIT = ["--hidden", "32", "--depth", "2", "--heads", "2", "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9",
       "--sample-every", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as in the SIGTERM subprocess (OMP_NUM_THREADS=1): the same reduction order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# One spec per training loop: its module, reduced tiny flags, where its run folder and checkpoint step are


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny random BERT (1 layer, 32 wide) and a tiny random ViT (1 layer, 24 wide) saved as transformers folders."""
    from transformers import ViTConfig, ViTModel
    d = tmp_path_factory.mktemp("enc")
    bert, vit = str(d / "bert"), str(d / "vit")
    write_tiny_bert(bert, phantom_texts(), layers=1, max_positions=160)
    ViTModel(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=48)).save_pretrained(vit)
    return bert, vit


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, phantom_dir, encoders):
    """Per script, the 32 px phantom with what it reads besides images: report embeddings (dit_text2img,
    controlnet), report and image embeddings (ldm_multicond), a 2-step dit_text2img backbone (controlnet)."""
    root = tmp_path_factory.mktemp("skeleton")
    text = str(root / "text")
    shutil.copytree(phantom_dir, text, ignore=shutil.ignore_patterns("text", "latents"))
    dit_text2img.main(["embed-text", "--data", text, "--text-encoder", encoders[0], "--name", "bert"])
    multi = str(root / "multi")
    shutil.copytree(phantom_dir, multi, ignore=shutil.ignore_patterns("text", "images", "latents"))
    ldm_multicond.main(["embed-text", "--data", multi, "--text-encoder", encoders[0], "--name", "bert",
                        "--max-length", "24"])
    ldm_multicond.main(["embed-images", "--data", multi, "--image-encoder", encoders[1], "--name", "vit"])
    backbone = str(root / "backbone")
    dit_text2img.main(["--data", text, "--out", backbone, *DIT, "--max-steps", "2", "--log-every", "2"])
    return {"pixels": phantom_dir, "text": text, "multi": multi, "backbone": backbone}


def safetensors_step(run):
    with safe_open(os.path.join(run, "ckpt.safetensors"), "pt") as f:
        return int(json.loads(f.metadata()["step"]))


def safetensors_tensors(run):
    with safe_open(os.path.join(run, "ckpt.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def flow_scm_step(run):
    with open(os.path.join(run, "latest.json")) as f:
        return json.load(f)["step"]


def flow_scm_tensors(run):
    """Weights and EMA (safetensors) and the optimizer state (.pt) of the newest checkpoint."""
    path = flow_scm.checkpoint_path(run)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = torch.load(path[:-len(".safetensors")] + ".pt", weights_only=True)
    for i, st in state["opt"]["state"].items():
        tensors.update({f"optim.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
    return tensors


SPECS = {
    "rectified_flow": dict(
        module=rectified_flow,
        flags=lambda data: ["--data", data["pixels"], "--hidden", "64", "--depth", "2", "--heads", "2",
                            "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9", "--sample-every", "0"],
        nan_flags=["--lr", "1e30"]),
    "flow_scm": dict(
        module=flow_scm,
        flags=lambda data: ["--size", "tiny", "--data", data["pixels"]],
        ckpt_step=flow_scm_step, ckpt_tensors=flow_scm_tensors,
        nan_flags=["--lr", "1e8", "--warmup", "1"]),
    "vae": dict(
        module=vae,
        nan_at="weights after step 2",                         # its gains overflow before its loss does
        flags=lambda data: ["--data", data["pixels"], "--channels", "8", "--mults", "1,2,2,2", "--head-channels", "8",
                            "--perceptual", "none", "--batch-size", "4", "--warmup", "3", "--kl-weight", "0.01",
                            "--sample-every", "0"],
        nan_flags=["--lr", "1e30"]),
    "dit_text2img": dict(
        module=dit_text2img,
        flags=lambda data: ["--data", data["text"], *DIT],
        nan_flags=["--lr", "1e30"]),
    "controlnet": dict(
        module=controlnet,
        flags=lambda data: ["--data", data["text"], "--backbone", data["backbone"], "--control-blocks", "1",
                            "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9", "--sample-every", "0"],
        nan_flags=["--lr", "1e30"]),
    "ldm_multicond": dict(
        module=ldm_multicond,
        flags=lambda data: ["--data", data["multi"], "--channels", "16", "--dim", "32", "--heads", "2",
                            "--tau-layers", "1", "--tau-heads", "2", "--tau-ff", "64", "--batch-size", "8",
                            "--max-length", "24", "--lr", "2e-3", "--ema", "0.9", "--sample-every", "0"],
        nan_flags=["--lr", "1e30"]),
    "downstream": dict(
        module=downstream,
        flags=lambda data: ["--train", f"real={data['pixels']}:train", "--labels", LABELS3, "--batch-size", "16",
                            "--schedule", "constant", "--eval-every", "1000", "--patience", "0", "--n-boot", "0",
                            "--width", "8"],
        run_dir=lambda out: os.path.join(out, "real", "run0"),
        nan_flags=["--lr", "1e30"]),
}
SCRIPTS = list(SPECS)


def flags(name, data, out, *extra):
    return [*SPECS[name]["flags"](data), "--out", out, *extra]


def run_dir(name, out):
    return SPECS[name].get("run_dir", lambda o: o)(out)


def ckpt_step(name, out):
    return SPECS[name].get("ckpt_step", safetensors_step)(run_dir(name, out))


def ckpt_tensors(name, out):
    return SPECS[name].get("ckpt_tensors", safetensors_tensors)(run_dir(name, out))


def losses(name, out):
    """(step, loss) of every log line of the run."""
    with open(os.path.join(run_dir(name, out), "log.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def complete_lines(path):
    """Lines of a file that another process appends to (a line being written is not counted)."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return f.read().count("\n")


def train(name, data, out, *extra):
    return SPECS[name]["module"].main(flags(name, data, out, *extra))


EVERY = ["--log-every", "4", "--ckpt-every", "100000"]   # health checks at log lines and every 10 steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory, datasets):
    """reference(name, n): the folder of an uninterrupted run of n steps with EVERY, made once per (name, n)."""
    runs = {}

    def get(name, n):
        if (name, n) not in runs:
            out = str(tmp_path_factory.mktemp(f"ref_{name}_{n}") / "run")
            train(name, datasets, out, "--max-steps", str(n), *EVERY)
            runs[name, n] = out
        return runs[name, n]
    return get


def same_run(name, a, b):
    """Losses of every log line and every checkpoint tensor (model, EMA, optimizer state) bit-identical."""
    assert losses(name, a) == losses(name, b)
    ta, tb = ckpt_tensors(name, a), ckpt_tensors(name, b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


# ----------------------------------------------------------------------------------------------------------------
# The promises


@pytest.mark.parametrize("name", SCRIPTS)
def test_sigterm_saves_a_checkpoint_that_resumes_to_the_uninterrupted_run(name, datasets, reference, tmp_path):
    out = str(tmp_path / "term")
    cmd = [sys.executable, os.path.join(ROOT, f"{name}.py"), *flags(name, datasets, out, "--max-steps", "100000",
                                                                    *EVERY)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    log_path = os.path.join(run_dir(name, out), "log.jsonl")
    try:
        for _ in range(6000):                                    # the first log line (or an early exit), <= 2 min
            if proc.poll() is not None or complete_lines(log_path):
                break
            time.sleep(0.02)
        # The signal lands in step 5, 6 or 7, which have no health check: a loop that breaks on the raw flag there
        # exits without the checkpoint; the skeleton saves at the next health check (step 8) and then exits.
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "stopped by SIGTERM" in text, text[-2000:]
    assert os.path.isfile(os.path.join(run_dir(name, out), "ckpt.safetensors")) or name == "flow_scm", text[-2000:]
    step = ckpt_step(name, out)
    assert 4 < step <= 20 and (step % 4 == 0 or step % 10 == 0), (step, text[-2000:])
    train(name, datasets, out, "--max-steps", str(step + 2), *EVERY)              # resumes at `step`
    same_run(name, reference(name, step + 2), out)


@pytest.mark.parametrize("name", SCRIPTS)
def test_non_finite_loss_stops_with_the_step_named_and_the_last_checkpoint_intact(name, datasets, tmp_path):
    out = str(tmp_path / "run")                # a huge learning rate: an early update overflows the weights
    with pytest.raises(SystemExit) as e:
        train(name, datasets, out, "--max-steps", "6", "--log-every", "1", "--ckpt-every", "1",
              *SPECS[name]["nan_flags"])
    message = str(e.value)
    # "loss at step N": step N's loss; "weights after step N": step N's update (vae.py's gains overflow before its
    # loss does). Either way the check ran before step N's checkpoint, so the one on disk is step N - 1's.
    found = re.fullmatch(r"non-finite (loss at|weights after) step (\d+); stopped, the last checkpoint (\S+) is intact",
                         message)
    assert found and found[3].startswith(run_dir(name, out)), message
    bad_step = int(found[2])
    assert f"{found[1]} step {bad_step}" == SPECS[name].get("nan_at", "loss at step 2"), message
    assert ckpt_step(name, out) == bad_step - 1, message
    logged = losses(name, out)                                  # every step before it logged a finite loss
    assert [s for s, _ in logged] == list(range(1, bad_step)) and all(math.isfinite(v) for _, v in logged)
    tensors = ckpt_tensors(name, out)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    assert tensors and not bad, bad[:5]


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_reproduces_the_uninterrupted_run(name, datasets, reference, tmp_path):
    b = str(tmp_path / "b")
    train(name, datasets, b, "--max-steps", "8", *EVERY)       # the final checkpoint at step 8
    train(name, datasets, b, "--max-steps", "10", *EVERY)      # resumes at step 8
    assert [s for s, _ in losses(name, b)] == [4, 8, 10]
    same_run(name, reference(name, 10), b)
    c = str(tmp_path / "c")                                     # the comparison can fail: another seed differs
    train(name, datasets, c, "--max-steps", "4", *EVERY, "--seed", "1")
    assert losses(name, c)[0] != losses(name, reference(name, 10))[0]


# ----------------------------------------------------------------------------------------------------------------
# The copies: tests/check_copies.py against tests/skeleton_reference.py, and the canonical pieces themselves


def copy_tree(dst):
    """The files the copy check reads, copied to a temporary tree (the real files are never modified)."""
    os.makedirs(os.path.join(dst, "tests"))
    shutil.copy(os.path.join(ROOT, check_copies.REFERENCE), os.path.join(dst, check_copies.REFERENCE))
    for script in skeleton_reference.PIECES:
        shutil.copy(os.path.join(ROOT, script), os.path.join(dst, script))


def test_every_skeleton_copy_matches_the_reference():
    assert check_copies.check(ROOT) == []
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "check_copies.py")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "all skeleton copies match" in r.stdout, r.stdout + r.stderr


def test_a_one_character_change_to_any_copy_is_caught_and_fix_restores_it(tmp_path):
    """Every marked copy gets a one-character change in a line in the middle of its body: the check names exactly
    the changed copies (file, line, piece) and nothing else, and --fix restores the files byte for byte. One check
    reads every script, so each round changes the k-th copy of every script at once (16 rounds instead of one per
    copy, 113): the unchanged copies of the same files must stay unreported, as a single change's would."""
    root = str(tmp_path / "tree")
    copy_tree(root)
    originals = {s: open(os.path.join(root, s)).read() for s in skeleton_reference.PIECES}
    copies = {s: check_copies.blocks(originals[s], s) for s in skeleton_reference.PIECES}
    n = 0
    for k in range(max(len(found) for found in copies.values())):
        want = []
        for script, found in copies.items():
            if k >= len(found):
                continue
            name = found[k][0]
            start, end = found[k][3:5]                           # (name, source, renames, start, end)
            lines = originals[script].split("\n")
            i = next(m for m in range((start + end) // 2, end)   # a line in the middle of the copy (not blank)
                     if any(c.isalnum() for c in lines[m]))
            j = next(m for m, c in enumerate(lines[i]) if c.isalnum())
            lines[i] = lines[i][:j] + ("x" if lines[i][j] != "x" else "y") + lines[i][j + 1:]
            with open(os.path.join(root, script), "w") as f:
                f.write("\n".join(lines))
            want.append((f"{script}:{start + 1}: skeleton {name!r} differs from {check_copies.REFERENCE}", lines[i]))
            n += 1
        problems = check_copies.check(root)
        assert sorted(p.split("\n")[0] for p in problems) == sorted(head for head, _ in want)
        for head, changed in want:                               # each diff shows its own changed line
            assert any(p.startswith(head + "\n") and ("\n+" + changed) in p for p in problems), head
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "check_copies.py"), "--root", root],
                           capture_output=True, text=True, timeout=60) if k == 0 else None
        assert r is None or (r.returncode == 1 and all(head in r.stdout for head, _ in want)), r
        assert check_copies.check(root, fix=True) == problems
        for script in skeleton_reference.PIECES:                 # restored byte for byte
            assert open(os.path.join(root, script)).read() == originals[script], (k, script)
    assert n == sum(len(p) for p in skeleton_reference.PIECES.values()) >= 7 * 4
    assert check_copies.check(root) == []                        # the restored tree


def test_a_missing_copy_a_stray_marker_and_declared_renames(tmp_path):
    root = str(tmp_path / "tree")
    copy_tree(root)
    path = os.path.join(root, "vae.py")
    text = open(path).read()
    start = text.index("# --- skeleton: ema_decay")
    end = text.index("# --- end skeleton: ema_decay ---\n") + len("# --- end skeleton: ema_decay ---\n")
    with open(path, "w") as f:                                   # markers removed: the copy is no longer checked
        f.write(text[:start] + text[end:])
    assert check_copies.check(root) == ["vae.py: expected one marked copy of skeleton 'ema_decay', found 0"]
    block = text[start:end].replace("(copied from tests/skeleton_reference.py;",
                                    "(copied from tests/skeleton_reference.py, renames: ema_decay->ema_at;")
    with open(path, "w") as f:                                   # a declared rename: the renamed copy matches
        f.write(text[:start] + block.replace("def ema_decay(", "def ema_at(") + text[end:])
    assert check_copies.check(root) == []
    with open(path, "w") as f:                                   # an unclosed block is a one-line error
        f.write(text[:start] + text[start:end].split("# --- end")[0] + text[end:])
    with pytest.raises(SystemExit, match=r"^vae.py:\d+: skeleton 'environment' starts inside 'ema_decay'$"):
        check_copies.check(root)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_save_respects_the_umask_and_cleans_up(tmp_path, umask):
    path = str(tmp_path / "sub" / "file.bin")

    def writes(text):
        def save(tmp):
            with open(tmp, "wb") as f:
                f.write(text)
        return save
    old = os.umask(umask)
    try:
        skeleton_reference.atomic_save(path, writes(b"one"))
        with open(str(tmp_path / "plain"), "wb"):                # the mode a plain open() gives, independently
            pass
    finally:
        os.umask(old)
    assert open(path, "rb").read() == b"one"
    assert os.stat(path).st_mode & 0o777 == os.stat(str(tmp_path / "plain")).st_mode & 0o777 == 0o666 & ~umask

    def fails(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a full disk raises mid-write
    with pytest.raises(SystemExit) as e:
        skeleton_reference.atomic_save(path, fails)
    assert str(e.value) == f"{path}: cannot write (No space left on device); any previous version of it is intact"
    assert open(path, "rb").read() == b"one"                     # the old file is intact, the temporary file gone
    assert os.listdir(os.path.dirname(path)) == ["file.bin"]
    with pytest.raises(SystemExit, match=r"^\S+/file.bin/x: cannot write \((File exists|Not a directory)\)"):
        skeleton_reference.atomic_save(path + "/x", writes(b"two"))   # a file where a folder should be


def test_bad_checkpoint_files_and_devices_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit) as e:
        skeleton_reference.open_checkpoint(str(junk), "vae/1", "a vae.py checkpoint", ("model.",))
    assert str(e.value).startswith(f"{junk}: not a readable safetensors file") and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="no such checkpoint; expected a vae.py checkpoint"):
        skeleton_reference.open_checkpoint(str(tmp_path / "none"), "vae/1", "a vae.py checkpoint", ("model.",))
    with pytest.raises(SystemExit, match=r"^--device 'gpu': expected cpu or cuda$"):
        skeleton_reference.setup_distributed("gpu")


# ----------------------------------------------------------------------------------------------------------------
# The input and output rules every script shares (issue 19): names from data, output folders, meta.csv, shards

R = skeleton_reference


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", "a\\b", ".hidden", "..", ".", "", "a\0b"])
def test_file_in_refuses_every_name_that_could_leave_the_folder(tmp_path, name):
    with pytest.raises(SystemExit) as e:
        R.file_in(str(tmp_path), name, ".png", where="m.csv")
    assert str(e.value).startswith(f"m.csv: id {name!r} is not usable as a file name") and "\n" not in str(e.value)


def test_file_in_keeps_ordinary_ids_inside_the_folder(tmp_path):
    for name in ["00000001_000", "p10_s5_d.2", "patient 7", "é-ü", "a..b"]:
        path = R.file_in(str(tmp_path), name, ".png")
        assert os.path.dirname(os.path.realpath(path)) == os.path.realpath(str(tmp_path))
    with pytest.raises(SystemExit, match=r"^t.csv: id 'b' appears more than once; expected unique ids$"):
        R.check_ids(["a", "b", "c", "b", "a"], "t.csv")                  # the first repeat in reading order


def test_check_counts_names_the_flag():
    class C:
        n, batch_size, sample_every = 4, 0, 0
    R.check_counts(C, positive=("n",), non_negative=("sample_every",))
    with pytest.raises(SystemExit, match=r"^--batch-size 0: expected a positive integer$"):
        R.check_counts(C, positive=("n", "batch_size"))
    C.sample_every = -1
    with pytest.raises(SystemExit, match=r"^--sample-every -1: expected an integer >= 0$"):
        R.check_counts(C, non_negative=("sample_every",))


def snapshot_files(root):
    """{relative path: bytes} of every file under root."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return found


def test_claim_output_claims_resumes_and_refuses(tmp_path):
    out = str(tmp_path / "fake")
    record = {"command": "x.py sample", "seed": 0, "cond": ("sex=F",)}
    R.claim_output(out, record)                                          # a new folder: claimed
    assert json.load(open(os.path.join(out, "output.json"))) == {**record, "cond": ["sex=F"]}
    open(os.path.join(out, "0.png"), "w").close()
    R.claim_output(out, dict(record))                                    # the same record: resumed
    with pytest.raises(SystemExit, match=r"^--out \S+fake: written with seed = 0, this run has 1; use a new --out"):
        R.claim_output(out, {**record, "seed": 1})
    with pytest.raises(SystemExit, match=r"written with extra = None, this run has 'x'"):
        R.claim_output(out, {**record, "extra": "x"})                    # a key only one side has counts too
    data = tmp_path / "dataset"                                          # a folder this command did not write
    (data / "shards").mkdir(parents=True)
    (data / "meta.csv").write_text("id\n")
    before = snapshot_files(str(data))
    with pytest.raises(SystemExit, match=r"holds files this command did not write \(meta.csv, shards\)"):
        R.claim_output(str(data), record)
    assert snapshot_files(str(data)) == before and not (data / "output.json").exists()   # refused, left as it was
    (data / "ckpt.safetensors").write_bytes(b"")
    R.claim_output(str(data), record, mine=("ckpt.safetensors",))        # a run folder from before output.json
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"^--out \S+file: a file; expected a folder"):
        R.claim_output(str(tmp_path / "file"), record)
    (tmp_path / "quiet").mkdir()                                         # a rank other than 0 checks, never writes
    R.claim_output(str(tmp_path / "quiet"), record, write=False)
    assert os.listdir(str(tmp_path / "quiet")) == []
    (tmp_path / "quiet" / ".tmp-output.json").write_text("{")          # rank 0's write in flight: not a file
    R.claim_output(str(tmp_path / "quiet"), record, write=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "output.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"output.json: not readable JSON"):
        R.claim_output(str(tmp_path / "bad"), record)
    (tmp_path / "bad" / "output.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"output.json: holds a JSON list; expected the record"):
        R.claim_output(str(tmp_path / "bad"), record)


def test_claim_output_names_another_command_first_and_cleans_only_its_own_folders(tmp_path):
    other = str(tmp_path / "other")
    R.claim_output(other, {"command": "a.py sample", "seed": 0})
    with pytest.raises(SystemExit, match=r"written with command = 'a.py sample', this run has 'b.py edit'"):
        R.claim_output(other, {"command": "b.py edit", "cfg": 1.0})    # not "cfg = None": the command first
    (tmp_path / "other" / ".tmp-half").write_bytes(b"x")
    with pytest.raises(SystemExit):
        R.claim_output(other, {"command": "b.py edit"})
    assert os.path.exists(os.path.join(other, ".tmp-half"))            # a refused folder is left as it is
    R.claim_output(other, {"command": "a.py sample", "seed": 0})
    assert not os.path.exists(os.path.join(other, ".tmp-half"))        # a resumed one loses a killed write's


def test_clean_temporaries_removes_only_atomic_save_leftovers(tmp_path):
    for name in [".tmp-abc123ckpt.safetensors", ".tmp-x", "ckpt.safetensors", ".hidden", "log.jsonl"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".tmp-dir").mkdir()
    R.clean_temporaries(str(tmp_path))
    assert sorted(os.listdir(str(tmp_path))) == [".hidden", ".tmp-dir", "ckpt.safetensors", "log.jsonl"]
    R.clean_temporaries(str(tmp_path / "absent"))                        # nothing to clean: no error


def test_resume_log_keeps_whole_records_up_to_the_resumed_step(tmp_path):
    path = str(tmp_path / "log.jsonl")
    with open(path, "w") as f:          # steps 1-6 logged, the checkpoint at 4, then a kill mid-line
        f.write("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    R.resume_log(path, 4)
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3, 4]
    R.resume_log(str(tmp_path / "none.jsonl"), 4)                        # no log yet: nothing to do
    assert not os.path.exists(str(tmp_path / "none.jsonl"))


def write_table(path, header, rows):
    with open(path, "w", newline="") as f:
        f.write(",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows))


def test_read_meta_rules(tmp_path):
    path = str(tmp_path / "meta.csv")
    write_table(path, ["id", "split", "age"], [["a", "train", "60"], ["b", "test", ""], ["c", "train", "70"]])
    rows, columns = R.read_meta(path, required=("age",), split="train")
    assert [r["id"] for r in rows] == ["a", "c"] and columns == ["id", "split", "age"]
    assert len(R.read_meta(path, split="all")[0]) == 3
    with pytest.raises(SystemExit, match=r"^\S+meta.csv: no column\(s\) sex, race; expected FORMAT.md §2 columns$"):
        R.read_meta(path, required=("sex", "age", "race"))
    write_table(path, ["id", "age"], [["a", "60"]])
    with pytest.raises(SystemExit, match=r"no column\(s\) split"):     # a split asked of a table without one
        R.read_meta(path, split="train")
    write_table(path, ["id", "split"], [["a", "train"], ["a", "test"]])
    with pytest.raises(SystemExit, match=r"id 'a' appears more than once"):
        R.read_meta(path)
    write_table(path, ["id", "split"], [["../x", "train"]])
    with pytest.raises(SystemExit, match=r"id '../x' is not usable as a file name"):
        R.read_meta(path)
    write_table(path, ["id", "split"], [["a", "train", "extra"]])
    with pytest.raises(SystemExit, match=r"row 2 has more cells than the header's 2"):
        R.read_meta(path)
    write_table(path, ["id", "split"], [["a"]])
    with pytest.raises(SystemExit, match=r"row 2 has fewer cells than the header's 2"):
        R.read_meta(path)
    with pytest.raises(SystemExit, match=r"none.csv: no such file; expected a dataset folder"):
        R.read_meta(str(tmp_path / "none.csv"))
    with open(path, "wb") as f:
        f.write(b"id\n\xff\xfe\n")
    with pytest.raises(SystemExit, match=r"not a readable CSV table"):
        R.read_meta(path)


def test_check_age_one_rule():
    assert R.check_age("65", "x") == 65.0 and R.check_age(58.5, "x") == 58.5 and R.check_age(0, "x") == 0.0
    assert math.isnan(R.check_age("", "x")) and math.isnan(R.check_age("nan", "x"))
    for bad in ["-5", "1e9", "abc", "inf", float("nan"), 120.5]:
        with pytest.raises(SystemExit, match=r"^--set: age .*; expected years in 0-120 or empty$"):
            R.check_age(bad, "--set")


def test_shard_rows_and_tensor_checks(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "00000.safetensors")
    save_file({"images": torch.zeros(3, 1, 4, 4, dtype=torch.uint16), "masks": torch.zeros(3, 2, 4, 4)}, path)
    assert R.shard_tensor_shape(path, "images", "U16") == [3, 1, 4, 4]
    with pytest.raises(SystemExit, match=r"'masks' stored as F32; expected U16"):
        R.shard_tensor_shape(path, "masks", "U16")                       # a float shard is not images
    assert R.shard_tensor_shape(path, "masks", ("F32", "F16", "BF16")) == [3, 2, 4, 4]   # any of the listed
    with pytest.raises(SystemExit, match=r"'images' stored as U16; expected F32 or F16 \(FORMAT.md\)$"):
        R.shard_tensor_shape(path, "images", ("F32", "F16"))
    with pytest.raises(SystemExit, match=r"no tensor 'latents' \(has images, masks\)"):
        R.shard_tensor_shape(path, "latents", "F32")
    with pytest.raises(SystemExit, match=r"no such shard"):
        R.shard_tensor_shape(str(tmp_path / "00001.safetensors"), "images", "U16")
    with open(str(tmp_path / "junk.safetensors"), "wb") as f:
        f.write(b"\x10" * 20)
    with pytest.raises(SystemExit, match=r"junk.safetensors: not a readable safetensors shard"):
        R.shard_tensor_shape(str(tmp_path / "junk.safetensors"), "images", "U16")
    rows = [{"id": "a", "shard": "0", "index": "2"}]
    R.check_shard_rows(rows, {0: 3}, "m.csv")
    for row, pattern in [({"index": "3"}, r"has index 3; shard 0 holds rows 0..2"), ({"index": "-1"}, r"has index -1"),
                         ({"shard": "1"}, r"names shard 1, which does not exist"),
                         ({"index": "x"}, r"has shard .* expected integers"),
                         ({"shard": None}, r"has shard None, .* expected integers")]:
        with pytest.raises(SystemExit, match=r"^m.csv: row 'a' " + pattern):
            R.check_shard_rows([{**rows[0], **row}], {0: 3}, "m.csv")


def test_radvae_decoder_reader_refuses_what_it_cannot_read(tmp_path):
    from safetensors.torch import save_file
    junk = str(tmp_path / "decoder.safetensors")
    with open(junk, "wb"):
        pass
    with pytest.raises(SystemExit, match=r"decoder.safetensors: not a readable decoder.safetensors"):
        R.load_radvae_decoder(junk)
    save_file({"conv_in": torch.zeros(1)}, junk, metadata={"spec": json.dumps({"format": "other/1"})})
    with pytest.raises(SystemExit, match=r"decoder format 'other/1'; expected 'radvae-decoder/1'"):
        R.load_radvae_decoder(junk)


def latent_folder(tmp_path, safetensors=True, program=True):
    """A latent folder with C = 2 channels: a decoder.safetensors of one 1x1 convolution (no blocks: images are
    clamp(a . raw + b), a closed form) and/or a decoder.pt2 that is no program (it must not be opened unless the
    test's fake torch.export.load stands in)."""
    from safetensors.torch import save_file
    folder = tmp_path / "lat"
    folder.mkdir()
    info = {}
    if safetensors:
        a, b = torch.tensor([0.25, -0.5]), 0.125
        conv_in = torch.cat([a, torch.tensor([b])]).view(1, 3, 1, 1)   # input: raw latents and a ones channel
        spec = {"format": "radvae-decoder/1", "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256, "blocks": []}
        save_file({"conv_in": conv_in, "conv_out": torch.ones(1, 1, 1, 1)}, str(folder / "decoder.safetensors"),
                  metadata={"spec": json.dumps(spec)})
        info["decoder_safetensors"] = "decoder.safetensors"
    if program:
        (folder / "decoder.pt2").write_bytes(b"crafted: not a torch.export program")
        info["decoder"] = "decoder.pt2"
    return str(folder), info


MEAN, STD = torch.tensor([0.5, -1.0]).view(-1, 1, 1), torch.tensor([2.0, 0.25]).view(-1, 1, 1)


def test_latent_decoder_refuses_a_decoder_outside_the_folder(tmp_path):
    folder, _ = latent_folder(tmp_path)
    (tmp_path / "evil.pt2").write_bytes(b"x")
    os.symlink(tmp_path / "evil.pt2", os.path.join(folder, "link.pt2"))     # inside by name, outside in fact
    for name in (str(tmp_path / "evil.pt2"), "../evil.pt2", "sub/../../evil.pt2", "link.pt2"):
        for key in ("decoder", "decoder_safetensors"):
            with pytest.raises(SystemExit, match=rf"info.json: {key} '{re.escape(name)}' is outside the latent "
                                                 rf"folder; expected a file in "):
                R.load_latent_decoder(folder, {key: name}, MEAN, STD, "cpu")
    assert R.latent_folder_file(folder, {"decoder": "./decoder.pt2"}, "decoder") == \
        os.path.realpath(os.path.join(folder, "decoder.pt2"))
    assert R.decoder_files(folder, {}) == ("", "")


def test_latent_decoder_prefers_safetensors_and_denormalises(tmp_path, monkeypatch, capsys):
    folder, info = latent_folder(tmp_path)
    opened = []
    monkeypatch.setattr(torch.export, "load", lambda path: opened.append(path))
    decode = R.load_latent_decoder(folder, info, MEAN, STD, "cpu")
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    raw = z.double() * STD.double() + MEAN.double()               # FORMAT.md §7: decoders take raw latents
    want = (0.25 * raw[:, 0:1] - 0.5 * raw[:, 1:2] + 0.125).clamp(-1, 1)
    got = decode(z)
    assert got.shape == (3, 1, 4, 4) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-6)
    assert not got.requires_grad and opened == [] and capsys.readouterr().out == ""
    assert R.has_decoder(folder, info) and R.has_decoder(folder, {"decoder": "decoder.pt2"})
    assert not R.has_decoder(folder, {"decoder": "absent.pt2"})


def test_latent_decoder_runs_a_program_only_when_allowed_and_says_so_first(tmp_path, monkeypatch, capsys):
    folder, info = latent_folder(tmp_path, safetensors=False)
    said_before = []

    class Program:                                               # what torch.export.load returns: .module()
        def module(self):
            return torch.nn.Identity()

    monkeypatch.setattr(torch.export, "load", lambda path: said_before.append((path, capsys.readouterr().out))
                        or Program())
    assert R.load_latent_decoder(folder, info, MEAN, STD, "cpu", allow_program=False) is None
    assert said_before == [] and capsys.readouterr().out == ""    # not opened, nothing said
    decode = R.load_latent_decoder(folder, info, MEAN, STD, "cpu")
    [(path, out)] = said_before
    assert path == os.path.realpath(os.path.join(folder, "decoder.pt2"))
    assert out.count("\n") == 1 and out.startswith(path + ": the decoder, a torch.export program (.pt2), which can "
                                                       "run code when loaded") and "no decoder.safetensors" in out
    z = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(decode(z).double(), z.double() * STD.double() + MEAN.double(), atol=1e-6)
    monkeypatch.undo()                                           # the real loader: the crafted file is no program
    with pytest.raises(SystemExit, match=r"decoder.pt2: not a loadable torch.export program"):
        R.load_latent_decoder(folder, info, MEAN, STD, "cpu")
    with pytest.raises(SystemExit, match=r"info.json: no decoder found \(decoder_safetensors '', decoder ''\)"):
        R.load_latent_decoder(folder, {}, MEAN, STD, "cpu")


# ----------------------------------------------------------------------------------------------------------------
# One vocabulary: the same flags for the same things in every training loop

COMMON_FLAGS = {"--data", "--out", "--size", "--batch-size", "--micro-batch", "--max-steps", "--lr", "--clip", "--seed",
                "--resume", "--no-resume", "--device", "--compile", "--log-every", "--ckpt-every", "--bench",
                "--dry-run"}
GRID_FLAGS = {"--grad-ckpt", "--sample-every"}                  # all but downstream.py (small CNNs, no grids)


@pytest.mark.parametrize("name", SCRIPTS)
def test_training_flags_share_one_vocabulary(name, capsys):
    with pytest.raises(SystemExit) as e:
        SPECS[name]["module"].main((["train"] if name == "flow_scm" else []) + ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = re.findall(r"^  (--[a-z][a-z0-9-]*)(?: [A-Z_]+)?(?:, (--[a-z][a-z0-9-]*))?", text, re.M)
    listed = {flag for pair in options for flag in pair if flag}       # '  --resume, --no-resume  help...'
    wanted = COMMON_FLAGS | (GRID_FLAGS if name != "downstream" else set())
    assert wanted <= listed, sorted(wanted - listed)
    assert "--grad-clip" not in listed and "cpu | cuda" in text


def test_old_spellings_and_downstream_data(datasets, capsys):
    flow_scm.main(["--size", "tiny", "--data", datasets["pixels"], "--grad-clip", "0.5", "--dry-run"])
    assert json.loads(capsys.readouterr().out.split("\n")[0])["clip"] == 0.5     # flow_scm.py's old --grad-clip
    assert downstream.parse_config(["--data", "d/x"]).train == "real=d/x:train"
    assert downstream.parse_config(["--data", "d/x", "--train", "syn=s"]).train == "syn=s"
    assert downstream.parse_config([]).train == "real=data/phantom:train"        # the default is unchanged

"""Run a test file's test_triton_* tests in TRITON_INTERPRET=1 subprocesses and read back each test's verdict
(used by tests/test_kernels.py and tests/test_kernel_presets.py, whose docstrings say why a subprocess is needed).

Only the tests this pytest session selected are run (a `-k` or node-id selection in the parent carries over), and
they are dealt round-robin to up to MAX_SHARDS subprocesses that run at the same time: triton's interpreter is
single-threaded Python and the parent process only waits for it, so on the 2-core CI machine two subprocesses
take about half the wall time of one. The tests themselves are unchanged: each still runs, in full, in a process
where the interpreter is live, and a failure or error there fails the parent's test of the same name.
"""
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Our choice: the CI machine's 2 cores. Each further subprocess costs one more torch + triton import (~3 s).
MAX_SHARDS = 2


def selected_names(session, path, prefix="test_triton_"):
    """Names (with parameters) of the tests of file `path` starting with `prefix` that this session runs, in
    collection order."""
    path = os.path.abspath(path)
    return tuple(item.name for item in session.items
                 if os.path.abspath(str(item.path)) == path and item.name.startswith(prefix))


def _read_report(report):
    """{test name: None if it passed, else the failure / error / skip message and traceback tail}."""
    verdicts = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
        verdicts[case.get("name")] = (f"in the TRITON_INTERPRET=1 subprocess: {bad[0].get('message')}\n"
                                      f"{(bad[0].text or '')[-3000:]}" if bad else None)
    return verdicts


def verdicts(path, names, extra_env=None, timeout=900):
    """Run tests `names` of file `path` with TRITON_INTERPRET=1 (plus `extra_env`); {name: None or why}. The key
    "" holds why a subprocess gave no report (it crashed or ran past `timeout` seconds)."""
    path = os.path.abspath(path)
    shards = max(1, min(MAX_SHARDS, os.cpu_count() or 1, len(names)))
    env = dict(os.environ, TRITON_INTERPRET="1", **(extra_env or {}))
    if shards > 1:
        env["OMP_NUM_THREADS"] = "1"          # one core each: threads of one would only wait for the other's
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i in range(shards):
            run = dict(report=os.path.join(tmp, f"report{i}.xml"), log=open(os.path.join(tmp, f"log{i}.txt"), "w+"))
            ids = [f"{path}::{name}" for name in names[i::shards]]
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={run['report']}",
                   *ids]
            run["proc"] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=run["log"], stderr=subprocess.STDOUT)
            runs.append(run)
        deadline = time.monotonic() + timeout
        try:
            for run in runs:
                run["proc"].wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass                                 # past the deadline: killed below; no report, so its tests fail
        finally:                                 # also when the parent is interrupted (Ctrl-C)
            for run in runs:
                if run["proc"].poll() is None:
                    run["proc"].kill()
                    run["proc"].wait()
        for run in runs:
            run["log"].seek(0)
            tail = run["log"].read()[-3000:]
            run["log"].close()
            if not os.path.exists(run["report"]):
                result[""] = f"interpreter subprocess wrote no report (rc {run['proc'].returncode}):\n{tail}"
                continue
            result.update(_read_report(run["report"]))
    return result

"""The harness of the bad-input tables (tests/test_bad_input_*.py, README.md "What is guaranteed"): a script's
main(argv) is run in this process on an input a careless or hostile user could give, and must refuse it cleanly:

- it stops with SystemExit carrying one line that matches the table's pattern (or argparse's usage error: exit 2
  with one 'error:' line on stderr): no other exception, so no traceback, and no exit 0 (silent acceptance);
- every file under the watched folders is unchanged afterwards: none added, removed or altered.

`confined` checks the other promise of writers that name files from data: whatever the run does (refuse or write),
nothing appears outside its output folder.
"""
import contextlib
import hashlib
import io
import os
import re


def snapshot(root):
    """{path relative to root: sha256 of the bytes, or 'dir'} of everything under root ({} if root is absent)."""
    found = {}
    if os.path.isfile(root):
        with open(root, "rb") as f:
            return {".": hashlib.sha256(f.read()).hexdigest()}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            found[os.path.relpath(os.path.join(folder, d), root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def run_main(main, argv):
    """-> (exit code or message, stdout, stderr) of main(argv); SystemExit(None / 0) and a plain return are 0."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return (0 if code is None else code), out.getvalue(), err.getvalue()


def expect_refusal(main, argv, pattern, watch=()):
    """main(argv) must refuse with one line matching `pattern` (re.search) and leave every file under each `watch`
    path as it was. -> the message."""
    watch = [str(w) for w in watch]
    before = {w: snapshot(w) for w in watch}
    code, _, err = run_main(main, argv)
    if isinstance(code, str):
        message = code
    elif code == 2:                                              # argparse: usage line, then 'prog: error: ...'
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1, f"{argv}: exit 2 without one argparse error line: {err!r}"
        message = errors[0]
    else:
        raise AssertionError(f"{argv}: accepted silently (exit {code!r}), expected a refusal matching {pattern!r}")
    assert "\n" not in message.strip(), f"{argv}: the error is not one line: {message!r}"
    assert re.search(pattern, message), f"{argv}: error {message!r} does not match {pattern!r}"
    for w in watch:
        after = snapshot(w)
        changed = sorted(k for k in set(before[w]) | set(after) if before[w].get(k) != after.get(k))
        assert not changed, f"{argv}: files under {w} changed although the input was refused: {changed[:5]}"
    return message


def confined(main, argv, out, outside):
    """Run main(argv) (it may refuse or write) and require that nothing under `outside` changed except inside `out`
    (`out` is a folder under `outside`). -> main's exit code or message."""
    out, outside = os.path.abspath(str(out)), os.path.abspath(str(outside))
    inner = os.path.relpath(out, outside)
    before = snapshot(outside)
    code, _, _ = run_main(main, argv)
    after = snapshot(outside)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and k != inner and not k.startswith(inner + os.sep))
    assert not changed, f"{argv}: wrote outside {out}: {changed[:5]}"
    return code


def one_line_refusal(code, pattern):
    """For a `confined` run that must also refuse: its result is one line matching `pattern`."""
    assert isinstance(code, str) and "\n" not in code.strip() and re.search(pattern, code), \
        f"expected a one-line refusal matching {pattern!r}, got {code!r}"

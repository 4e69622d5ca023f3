"""Check that every marked copy of the training skeleton equals its canonical version in tests/skeleton_reference.py
(the way Hugging Face transformers checks its `# Copied from` blocks with utils/check_copies.py).

A copy in a script looks like

    # --- skeleton: NAME (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
    ...the code, exactly as in the reference...
    # --- end skeleton: NAME ---

and may declare renames after the source, `(copied from tests/skeleton_reference.py, renames: old->new, a->b; ...`:
each `old` identifier of the reference reads `new` in that copy. skeleton_reference.PIECES says which pieces each
script must hold.

    python tests/check_copies.py          # list every difference, exit 1 if any
    python tests/check_copies.py --fix    # rewrite the copies from the reference (markers stay where they are)
    python tests/check_copies.py --root DIR   # check another tree (the tests use a temporary copy)
"""
import argparse
import ast
import difflib
import os
import re
import sys

REFERENCE = "tests/skeleton_reference.py"
START = re.compile(r"^# --- skeleton: (\w+) \(copied from (\S+?)(?:, renames: ([^;]*))?; check: .*\) ---$")
END = re.compile(r"^# --- end skeleton: (\w+) ---$")


def blocks(text, where):
    """-> [(name, source, renames, first line index, end line index)] of the marked blocks of a file's lines."""
    lines, found, open_block = text.split("\n"), [], None
    for i, line in enumerate(lines):
        if line.startswith("# --- skeleton:"):
            m = START.match(line)
            if not m:
                raise SystemExit(f"{where}:{i + 1}: malformed skeleton marker {line!r}; expected '# --- skeleton: "
                                 f"NAME (copied from {REFERENCE}; check: python tests/check_copies.py) ---'")
            if open_block:
                raise SystemExit(f"{where}:{i + 1}: skeleton {m[1]!r} starts inside {open_block[0]!r}")
            renames = {}
            for pair in (m[3] or "").split(","):
                if pair.strip():
                    old, _, new = pair.partition("->")
                    if not (old.strip().isidentifier() and new.strip().isidentifier()):
                        raise SystemExit(f"{where}:{i + 1}: rename {pair.strip()!r}; expected old->new identifiers")
                    renames[old.strip()] = new.strip()
            open_block = (m[1], m[2], renames, i)
        elif line.startswith("# --- end skeleton:"):
            m = END.match(line)
            if not m or not open_block or m[1] != open_block[0]:
                raise SystemExit(f"{where}:{i + 1}: {line!r} does not close "
                                 f"{repr(open_block[0]) if open_block else 'any skeleton block'}")
            found.append((*open_block, i))
            open_block = None
    if open_block:
        raise SystemExit(f"{where}: skeleton {open_block[0]!r} has no '# --- end skeleton: {open_block[0]} ---'")
    return found


def body(text, start, end):
    return "\n".join(text.split("\n")[start + 1:end])


def renamed(code, renames):
    for old, new in renames.items():
        code = re.sub(rf"\b{re.escape(old)}\b", new, code)
    return code


def canonical(root):
    """{name: code} of the reference, and its PIECES table."""
    path = os.path.join(root, REFERENCE)
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected --root to be a repository root holding {REFERENCE}")
    with open(path) as f:
        text = f.read()
    pieces = {}
    for name, _, _, start, end in blocks(text, REFERENCE):
        pieces[name] = body(text, start, end)
    namespace = {}                                               # ALL and PIECES, evaluated without importing torch
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("ALL", "LATENT", "PLAN", "PIECES"):
            exec(compile(ast.Module([node], []), REFERENCE, "exec"), namespace)
    return pieces, namespace["PIECES"]


def check(root, fix=False):
    """-> list of one-line problems (and unified diffs); with fix, rewrites the differing copies in place."""
    pieces, table = canonical(root)
    problems = []
    for script, wanted in table.items():
        path = os.path.join(root, script)
        if not os.path.isfile(path):
            problems.append(f"{script}: no such file; {REFERENCE} lists it in PIECES")
            continue
        with open(path) as f:
            text = f.read()
        found = blocks(text, script)
        names = [b[0] for b in found]
        for name in wanted:
            if names.count(name) != 1:
                problems.append(f"{script}: expected one marked copy of skeleton {name!r}, found {names.count(name)}")
        lines = text.split("\n")
        for name, source, renames, start, end in reversed(found):   # bottom-up: line numbers stay valid
            if name not in pieces:
                problems.append(f"{script}:{start + 1}: skeleton {name!r} is not in {REFERENCE}")
                continue
            if source != REFERENCE:
                problems.append(f"{script}:{start + 1}: skeleton {name!r} copied from {source}; expected {REFERENCE}")
            want = renamed(pieces[name], renames)
            have = "\n".join(lines[start + 1:end])
            if have != want:
                diff = difflib.unified_diff(want.split("\n"), have.split("\n"), f"{REFERENCE} ({name})",
                                            f"{script}:{start + 2}", lineterm="", n=1)
                problems.append(f"{script}:{start + 1}: skeleton {name!r} differs from {REFERENCE}\n"
                                + "\n".join(diff))
                lines[start + 1:end] = want.split("\n")
        new = "\n".join(lines)
        if fix and new != text:
            with open(path, "w") as f:
                f.write(new)
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fix", action="store_true", help="rewrite the differing copies from the reference")
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="repository root [default: the one holding this file]")
    args = p.parse_args(argv)
    problems = check(args.root, fix=args.fix)
    for problem in problems:
        print(problem)
    if args.fix:
        print(f"rewrote {sum('differs' in p for p in problems)} copies" if problems else "all copies up to date")
        return 1 if any("differs" not in p for p in problems) else 0
    print(f"{len(problems)} problem(s)" if problems else "all skeleton copies match " + REFERENCE)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

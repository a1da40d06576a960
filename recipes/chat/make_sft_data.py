"""Instruction pairs from the Python standard library, for the instruction-tuning demo (docs/chat.md).

Every top-level or method `def` of 3-20 lines with a docstring becomes one example:
    instruction: Write a Python function `name(args)`: <the docstring's first paragraph>
    response:    the function's source (docstring removed, dedented)
No network and no benchmark data (HumanEval/MBPP stay unseen). Functions are split into train and
held-out by a hash of their qualified name, so the demo can ask about functions the model never saw.

    python recipes/chat/make_sft_data.py --out runs/chat/sft.jsonl --heldout runs/chat/heldout.jsonl
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
import textwrap
from pathlib import Path

MODULES = ("textwrap", "string", "json/decoder.py", "json/encoder.py", "fractions", "heapq", "bisect", "shlex",
           "glob", "fnmatch", "statistics", "colorsys", "calendar", "difflib", "base64", "html/__init__.py",
           "pprint", "reprlib", "ipaddress", "posixpath", "random", "tokenize", "inspect", "dataclasses", "enum",
           "functools", "operator", "pathlib", "urllib/parse.py", "email/utils.py", "csv", "configparser",
           "argparse", "gettext", "locale", "quopri", "uu", "wave", "zipfile", "tarfile", "shutil", "copy",
           "pickle", "datetime", "decimal", "_pydecimal", "numbers", "cmd", "codecs", "graphlib", "typing")


def examples(path: Path):
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
            continue
        doc = ast.get_docstring(node)
        n_lines = node.end_lineno - node.lineno + 1
        if not doc or not 3 <= n_lines <= 20 or node.decorator_list:
            continue
        summary = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
        if len(summary) < 15 or len(summary) > 200 or summary.startswith(node.name):
            continue
        body = node.body[1:]  # without the docstring
        if not body:
            continue
        head = lines[node.lineno - 1:body[0].lineno - 1]
        head = [ln for ln in head if not ln.strip().startswith(('"""', "'''", "r'''", 'r"""'))]
        # keep only the signature lines (up to the one ending with ':'), then the body
        sig_end = next(i for i, ln in enumerate(lines[node.lineno - 1:], node.lineno - 1) if ln.rstrip().endswith(":"))
        code = lines[node.lineno - 1:sig_end + 1] + lines[body[0].lineno - 1:node.end_lineno]
        code = textwrap.dedent("\n".join(code))
        args = ast.unparse(node.args)
        instruction = f"Write a Python function `{node.name}({args})`: {summary}"
        yield f"{path.stem}.{node.name}", {"instruction": instruction, "response": code}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    args = p.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen, train, held = set(), [], []
    for name in MODULES:
        path = stdlib / (name if name.endswith(".py") else f"{name}.py")
        if not path.is_file():
            continue
        for key, ex in examples(path):
            if key in seen:
                continue
            seen.add(key)
            h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
            (held if h < args.heldout_fraction else train).append(ex)
    for out, rows in ((args.out, train), (args.heldout, held)):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(train)} training and {len(held)} held-out examples from {len(MODULES)} modules", file=sys.stderr)


if __name__ == "__main__":
    main()

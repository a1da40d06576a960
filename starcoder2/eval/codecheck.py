"""Static checks on generated code: does it parse, what do ruff and bandit find, and which imports
resolve to nothing (hallucinated dependencies, a supply-chain risk: an attacker can register the name).

    check_code("import os\\neval(input())")      # one program
    check_many(codes)                          # one ruff and one bandit process for all of them
    summarize(results, lines=total_lines)      # rates and findings per thousand lines

Each result:
    syntax_valid: bool, syntax_error: str | None
    ruff: [{"code", "message", "line"}] | None        None: not checked (ruff missing or code does not parse)
    bandit: [{"test_id", "severity", "confidence", "message", "line"}] | None
    imports: top-level modules imported; hallucinated_imports: those that are neither standard library,
        nor installed in this environment, nor in the allow-list (`ALLOWED_IMPORTS`)

The code is only read, never run. ruff and bandit run as subprocesses on files in a temporary
directory (ruff `--isolated`: the project's own ruff config does not apply). "Not installed" is not
"does not exist": the allow-list holds well-known PyPI import names so that `import pandas` on a
machine without pandas is not counted; nothing is looked up online.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

# pycodestyle errors/warnings, pyflakes, bugbear. Line length and trailing whitespace are left out:
# they measure the benchmark prompt's formatting, not the generated code.
RUFF_SELECT = "E,F,W,B"
RUFF_IGNORE = "E501,W291,W293"
# assert_used: benchmark solutions and their checks use assert by design.
BANDIT_SKIP = "B101"
TOOL_TIMEOUT_S = 120

# Well-known import names of real PyPI packages, accepted even when not installed here.
ALLOWED_IMPORTS = frozenset("""
    aiohttp attr attrs boto3 bs4 click cv2 dateutil django fastapi flask h5py httpx jax jinja2 joblib
    keras lightgbm lxml matplotlib networkx nltk numba numpy pandas PIL plotly psutil psycopg2 pydantic
    pymysql pytest pytz redis regex requests scipy seaborn six sklearn sqlalchemy statsmodels sympy
    tensorflow toml torch tqdm transformers ujson xgboost yaml
""".split())


def check_code(code: str, allowed: frozenset[str] = ALLOWED_IMPORTS) -> dict:
    """All checks on one program (two tool processes; use check_many for many programs)."""
    return check_many([code], allowed)[0]


def check_many(codes: list[str], allowed: frozenset[str] = ALLOWED_IMPORTS) -> list[dict]:
    """All checks on many programs, in order, with one ruff and one bandit run over all of them."""
    results = [_parse_checks(code, allowed) for code in codes]
    valid = [i for i, r in enumerate(results) if r["syntax_valid"]]
    with tempfile.TemporaryDirectory(prefix="starcoder2-codecheck-") as d:
        for i in valid:
            Path(d, f"{i}.py").write_text(codes[i], encoding="utf-8")
        ruff = _ruff(d) if valid else {}
        bandit = _bandit(d) if valid else {}
    for i, r in enumerate(results):
        r["ruff"] = ruff.get(i, []) if ruff is not None and r["syntax_valid"] else None
        r["bandit"] = bandit.get(i, []) if bandit is not None and r["syntax_valid"] else None
    return results


def summarize(results: list[dict], lines: int) -> dict:
    """Rates over programs and counts per thousand lines (`lines`: total lines of the programs).
    Tool fields are None when no program was checked by that tool."""
    per_kloc = (lambda count: round(1000 * count / lines, 3)) if lines else (lambda count: None)
    n = len(results)
    out: dict = {"programs": n, "lines": lines,
                 "syntax_valid_rate": sum(r["syntax_valid"] for r in results) / n if n else None}
    for tool, rule in (("ruff", "code"), ("bandit", "test_id")):
        checked = [r[tool] for r in results if r.get(tool) is not None]
        findings = [f for fs in checked for f in fs]
        out[f"{tool}_checked"] = len(checked)
        out[f"{tool}_findings"] = len(findings) if checked else None
        out[f"{tool}_per_kloc"] = per_kloc(len(findings)) if checked else None
        out[f"{tool}_per_program"] = len(findings) / len(checked) if checked else None
        out[f"{tool}_program_rate"] = sum(bool(fs) for fs in checked) / len(checked) if checked else None
        out[f"{tool}_by_rule"] = dict(Counter(f[rule] for f in findings).most_common())
    out["bandit_by_severity"] = dict(Counter(f["severity"] for r in results for f in r.get("bandit") or []))
    names = [name for r in results for name in r["hallucinated_imports"]]
    out["hallucinated_imports"] = len(names)
    out["hallucinated_per_kloc"] = per_kloc(len(names))
    out["hallucinated_program_rate"] = sum(bool(r["hallucinated_imports"]) for r in results) / n if n else None
    out["hallucinated_names"] = dict(Counter(names).most_common())
    return out


# ---- syntax and imports ----------------------------------------------------------------------------


def _parse_checks(code: str, allowed: frozenset[str]) -> dict:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes in the source
        return {"syntax_valid": False, "syntax_error": f"{type(e).__name__}: {e}", "imports": [],
                "hallucinated_imports": []}
    imports = imported_modules(tree)
    return {"syntax_valid": True, "syntax_error": None, "imports": imports,
            "hallucinated_imports": [m for m in imports if not _resolves(m, allowed)]}


def imported_modules(tree: ast.AST) -> list[str]:
    """Top-level names of absolute imports, in order of first appearance: `import a.b`, `from a import
    b`, and `__import__("a")` / `importlib.import_module("a")` with a literal name."""
    found = []  # (line, column, dotted name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, node.col_offset, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.col_offset, node.module))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _is_dynamic_import(node.func)):
            found.append((node.lineno, node.col_offset, node.args[0].value))
    return list(dict.fromkeys(name.split(".")[0] for _, _, name in sorted(found) if name))


def _is_dynamic_import(func: ast.expr) -> bool:
    return (isinstance(func, ast.Name) and func.id in ("__import__", "import_module")) or (
        isinstance(func, ast.Attribute) and func.attr == "import_module")


def _resolves(module: str, allowed: frozenset[str]) -> bool:
    return module in allowed or module in _local_modules()


@functools.cache
def _local_modules() -> frozenset[str]:
    """Standard library, built-in modules and the import names of every installed distribution.
    (Not importlib.util.find_spec: it would also find whatever lies in the current directory.)"""
    return frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names) | frozenset(
        importlib.metadata.packages_distributions())


# ---- tools -----------------------------------------------------------------------------------------


def ruff_command() -> list[str] | None:
    try:
        from ruff.__main__ import find_ruff_bin

        return [find_ruff_bin()]
    except (ImportError, FileNotFoundError):
        path = shutil.which("ruff")
        return [path] if path else None


def bandit_command() -> list[str] | None:
    if importlib.util.find_spec("bandit") is not None:
        return [sys.executable, "-m", "bandit"]
    path = shutil.which("bandit")
    return [path] if path else None


def _index(filename: str) -> int:
    return int(Path(filename).stem)


def _ruff(directory: str) -> dict[int, list[dict]] | None:
    cmd = ruff_command()
    if cmd is None:
        return None
    out = _tool_json("ruff", cmd + ["check", "--output-format", "json", "--no-cache", "--isolated", "--exit-zero",
                            "--select", RUFF_SELECT, "--ignore", RUFF_IGNORE, directory])
    if out is None:
        return None
    found: dict[int, list[dict]] = {}
    for f in out:
        found.setdefault(_index(f["filename"]), []).append(
            {"code": f["code"], "message": f["message"], "line": f["location"]["row"]})
    return found


def _bandit(directory: str) -> dict[int, list[dict]] | None:
    cmd = bandit_command()
    if cmd is None:
        return None
    out = _tool_json("bandit", cmd + ["-f", "json", "-q", "-r", "-s", BANDIT_SKIP, directory])
    if out is None:
        return None
    found: dict[int, list[dict]] = {}
    for f in out.get("results", []):
        found.setdefault(_index(f["filename"]), []).append(
            {"test_id": f["test_id"], "severity": f["issue_severity"], "confidence": f["issue_confidence"],
             "message": f["issue_text"], "line": f["line_number"]})
    return found


def _tool_json(name: str, cmd: list[str]):
    """Run a linter, parse its JSON report; None (with a warning) when it cannot run or report."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)
        return json.loads(proc.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        log.warning("%s did not produce a report: %s", name, e)
        return None

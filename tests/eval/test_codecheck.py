"""Static checks on generated code: syntax, ruff, bandit, hallucinated imports, and the summary."""

import pytest

from starcoder2.eval import codecheck
from starcoder2.eval.codecheck import check_code, check_many, summarize

needs_ruff = pytest.mark.skipif(codecheck.ruff_command() is None, reason="ruff is not installed")
needs_bandit = pytest.mark.skipif(codecheck.bandit_command() is None, reason="bandit is not installed")

CLEAN = "import json\n\n\ndef dump(x):\n    return json.dumps(x)\n"
CODES = ["import os\n", "def f(:\n", CLEAN, "import numpy_fast_utils\nnumpy_fast_utils.go()\n"]


@pytest.fixture(scope="module")
def checked():
    return check_many(CODES)


@pytest.fixture
def no_tools(monkeypatch):
    """For tests of the parse-only checks: skip the (slow to start) linters."""
    monkeypatch.setattr(codecheck, "ruff_command", lambda: None)
    monkeypatch.setattr(codecheck, "bandit_command", lambda: None)


def test_syntax_error_is_reported_and_not_linted():
    r = check_code("def f(:\n    return 1\n")
    assert r["syntax_valid"] is False and "SyntaxError" in r["syntax_error"]
    assert r["ruff"] is None and r["bandit"] is None and r["hallucinated_imports"] == []


@needs_ruff
def test_ruff_finds_an_unused_import():
    r = check_code("import os\n\n\ndef f(x):\n    return x\n")
    assert r["syntax_valid"] and [f["code"] for f in r["ruff"]] == ["F401"]
    assert r["ruff"][0]["line"] == 1
    assert check_code(CLEAN)["ruff"] == []


@needs_bandit
def test_bandit_finds_eval_and_shell_true():
    r = check_code("import subprocess\n\n\ndef run(cmd):\n"
                   "    subprocess.call(cmd, shell=True)\n    return eval(input())\n")
    ids = {f["test_id"] for f in r["bandit"]}
    assert {"B602", "B307"} <= ids, r["bandit"]  # shell=True, eval
    assert any(f["severity"] == "HIGH" for f in r["bandit"])
    assert check_code(CLEAN)["bandit"] == []
    assert check_code("def f(x):\n    assert x > 0\n    return x\n")["bandit"] == []  # assert is not a finding here


def test_hallucinated_imports(no_tools):
    code = ("import json\nimport numpy as np\nimport numpy_fast_utils\nfrom collections import Counter\n"
            "from os.path import join\nfrom . import sibling\nimport importlib\n"
            "m = importlib.import_module('totally_made_up_pkg.sub')\nimport pandas\n")
    r = check_code(code)
    assert r["imports"] == ["json", "numpy", "numpy_fast_utils", "collections", "os", "importlib",
                            "totally_made_up_pkg", "pandas"]
    assert r["hallucinated_imports"] == ["numpy_fast_utils", "totally_made_up_pkg"]
    allowed = frozenset({"numpy_fast_utils"})
    assert check_code("import numpy_fast_utils\n", allowed=allowed)["hallucinated_imports"] == []


def test_check_many_keeps_order_and_matches_check_code(checked):
    assert [r["syntax_valid"] for r in checked] == [True, False, True, True]
    assert [r["hallucinated_imports"] for r in checked] == [[], [], [], ["numpy_fast_utils"]]
    assert checked[3] == check_code(CODES[3])


def test_summarize(checked):
    results = checked
    s = summarize(results, lines=10)
    assert s["programs"] == 4 and s["syntax_valid_rate"] == 0.75
    assert s["hallucinated_imports"] == 1 and s["hallucinated_per_kloc"] == 100.0
    assert s["hallucinated_program_rate"] == 0.25 and s["hallucinated_names"] == {"numpy_fast_utils": 1}
    if results[0]["ruff"] is not None:
        assert s["ruff_checked"] == 3 and s["ruff_by_rule"] == {"F401": 1}
        assert s["ruff_findings"] == 1 and s["ruff_per_kloc"] == 100.0
        assert s["ruff_program_rate"] == pytest.approx(1 / 3) and s["ruff_per_program"] == pytest.approx(1 / 3)
    # tools missing everywhere: their fields say "not checked", not "zero findings"
    missing = [dict(r, ruff=None, bandit=None) for r in results]
    s = summarize(missing, lines=0)
    assert s["ruff_findings"] is None and s["bandit_per_kloc"] is None and s["hallucinated_per_kloc"] is None
    assert summarize([], lines=0)["syntax_valid_rate"] is None


def test_missing_tools_give_none(no_tools):
    r = check_code("import os\n")
    assert r["syntax_valid"] and r["ruff"] is None and r["bandit"] is None

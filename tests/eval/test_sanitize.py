"""The EvalPlus-style sanitizer: known inputs and outputs, EvalPlus's rules, canonical solutions that
keep their behaviour (statically for every problem, in the sandbox for a sample), and `--sanitize`
through the runner and the CLI."""

from __future__ import annotations

import ast
import json

import pytest

from starcoder2 import cli
from starcoder2.eval import sanitize as sanitize_module
from starcoder2.eval.runner import EvalSettings, evaluate, judge
from starcoder2.eval.sanitize import (
    extract_code,
    fenced_code,
    longest_valid_run,
    sanitize,
    sanitize_completion,
)
from starcoder2.eval.tasks import get_task

from ._fixtures import (
    BENCHMARKS,
    HUMANEVAL_LIKE,
    INFILL_LIKE,
    RIGHT,
    write_jsonl_gz,
    write_samples,
)

CHAT_ANSWER = '''Sure! Here is a solution:

```python
import math

def helper(x):
    return x * 2

def f(x):
    return helper(x) + math.floor(1.5)

print(f(3))
assert f(1) == 3
if __name__ == "__main__":
    import sys
    print(f(int(sys.argv[1])))
```

It doubles x and adds one. Hope it helps!
'''


def test_chat_answer_keeps_imports_entry_point_and_helpers_only():
    assert sanitize(CHAT_ANSWER, "f") == (
        "import math\n"
        "def helper(x):\n    return x * 2\n"
        "def f(x):\n    return helper(x) + math.floor(1.5)")


@pytest.mark.parametrize("text, entry_point, expected", [
    # unreachable definitions go, globals and classes the entry point uses stay, in source order
    ("LIMIT = 10\nUNUSED = 3\nclass Box:\n    pass\ndef g():\n    return 1\ndef f(x):\n    return Box(), min(x, LIMIT)\n",
     "f", "LIMIT = 10\nclass Box:\n    pass\ndef f(x):\n    return Box(), min(x, LIMIT)"),
    # EvalPlus's rule: a function without `return` (the prompt's stub) gives way to a later full one
    ('def f(x):\n    """Double x."""\n\ndef f(x):\n    return 2 * x\n', "f", "def f(x):\n    return 2 * x"),
    # the first definition of a name wins
    ("def f():\n    return 1\ndef f():\n    return 2\n", "f", "def f():\n    return 1"),
    # imports come first, every one of them (once), wherever they were; top-level code goes
    ("def f():\n    return os.sep\nimport os\nimport os\nprint(f())\nf()\n", "f",
     "import os\ndef f():\n    return os.sep"),
    # deviations kept deliberately: generators, decorators and tuple assignments define names
    (("import functools\nA, B = 1, 2\n@functools.cache\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + A\n"
      "def gen():\n    yield B\ndef f(n):\n    return fib(n), list(gen())\n"), "f",
     ("import functools\nA, B = 1, 2\n@functools.cache\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + A\n"
      "def gen():\n    yield B\ndef f(n):\n    return fib(n), list(gen())")),
    # attribute and subscript targets define nothing; no entry point: every first definition stays
    ("x = 1\nx.y = 2\nd = {}\nd[0] = 1\ndef g():\n    return 3\n", None, "x = 1\nd = {}\ndef g():\n    return 3"),
    # nothing that parses: nothing
    ("I cannot help with that.", "f", ""),
])
def test_known_outputs(text, entry_point, expected):
    assert sanitize(text, entry_point) == expected


def test_code_extraction_follows_evalplus_longest_run():
    lines = ["def f(x):", "    return x", "The function returns x:", "y = 2", ""]
    # the run with the most non-blank lines that parses, as EvalPlus's code_extract
    assert longest_valid_run(lines)[0] == (0, 2)
    # ...and then the longest runs around it (EvalPlus would drop `y = 2`)
    assert extract_code("\n".join(lines)) == "def f(x):\n    return x\ny = 2"
    assert extract_code("x = 1\ny = 2\n") == "x = 1\ny = 2\n"  # valid text is returned as it is


def test_fences_python_blocks_only_and_unclosed():
    text = "Java:\n```java\nint f() { return 1; }\n```\nPython:\n```py\ndef f():\n    return 1\n```\nmore:\n```\nX = 2\n```"
    assert fenced_code(text) == "def f():\n    return 1\n\nX = 2\n"
    assert fenced_code("intro\n```python\ndef f():\n    return 1\n") == "def f():\n    return 1\n"  # cut off
    assert fenced_code("  ```python\n  def f():\n      return 1\n  ```") == "def f():\n    return 1\n"  # indented
    assert fenced_code("no fences\nx = 1") == "no fences\nx = 1"


def test_pathological_text_costs_a_bounded_number_of_parses(monkeypatch):
    calls = []
    real = sanitize_module.parses
    monkeypatch.setattr(sanitize_module, "parses", lambda code: calls.append(1) or real(code))
    text = "\n".join("Explanation" if i % 2 else "and this is prose." for i in range(60))  # valid, invalid, ...
    assert extract_code(text).startswith("Explanation")
    spans = 60 * 61 // 2  # EvalPlus's own search over the first run, then the bounded extra search
    assert len(calls) <= 1 + spans + sanitize_module.EXTRA_PARSES + 1


def test_completion_is_glued_to_the_prompt_and_keeps_prompt_helpers():
    prompt = ('def encode(s: str):\n    return s[::-1]\n\n\ndef decode(s: str):\n    """Inverse of encode."""\n')
    body = "    return s[::-1]\n"
    out = sanitize_completion(prompt, body, "decode")
    assert "def encode" in out and out.endswith('def decode(s: str):\n    """Inverse of encode."""\n\n    return s[::-1]')
    # a chat answer redefining the entry point in a fence replaces the prompt's stub
    chat = "Here you go:\n```python\ndef decode(s):\n    return ''.join(reversed(s))\n```\n"
    assert sanitize_completion(prompt, chat, "decode").endswith("def decode(s):\n    return ''.join(reversed(s))")


def _entry_point_ast(code: str, name: str) -> list[str]:
    return [ast.dump(n) for n in ast.parse(code).body if isinstance(n, ast.FunctionDef) and n.name == name]


@pytest.mark.parametrize("task_name", ["humaneval", "mbpp-plus-v0.1.0"])  # all four: checked by hand
def test_canonical_solutions_keep_their_entry_point_and_helpers(task_name):
    task = get_task(task_name)
    if task.filename is not None and not BENCHMARKS.is_dir():
        pytest.skip(f"benchmark files not found at {BENCHMARKS}")
    for p in task.load(BENCHMARKS if task.filename else None):
        original = p["prompt"] + p["canonical_solution"]
        sanitized = task.solution(p, p["canonical_solution"], sanitize=True)
        # the entry point's definition is the one that ran before (the last one), unchanged
        assert _entry_point_ast(sanitized, p["entry_point"]) == _entry_point_ast(original, p["entry_point"])[-1:] != []
        kept = {n.name for n in ast.parse(sanitized).body if isinstance(n, ast.FunctionDef)}
        assert sanitize_module.defined_names(p["prompt"]) <= kept, p["task_id"]


def test_canonical_solutions_still_pass_in_the_sandbox():
    task = get_task("humaneval")
    problems = {p["task_id"]: p for p in task.load()}
    # the ones whose prompt defines helpers the tests or the solution call, and two plain ones
    chosen = [problems[f"HumanEval/{i}"] for i in (0, 10, 32, 38, 50, 163)]
    items = [(p, 0, p["canonical_solution"]) for p in chosen]
    records = judge(task, items, EvalSettings(code_checks=False, workers=2, sanitize=True))
    assert [r["base"]["status"] for r in records] == ["passed"] * len(chosen), [r["base"] for r in records]
    assert all(r["solution"] == task.solution(p, c, sanitize=True) for r, (p, _, c) in zip(records, items))


def _chat(completion: str) -> str:
    """A chat model's answer: the whole function in a fence, with prose and a test call around it."""
    return f"Here is the function:\n```python\n{completion}\n```\nprint(add(1, 2))\n"


def test_sanitize_flag_through_the_cli(capsys, tmp_path):
    data = write_jsonl_gz(tmp_path / "he.jsonl.gz", HUMANEVAL_LIKE)
    answers = {p["task_id"]: _chat(p["prompt"] + RIGHT[p["task_id"]]) for p in HUMANEVAL_LIKE}
    samples = write_samples(tmp_path / "chat.jsonl", answers)
    base = ["eval", "humaneval", "--samples", samples, "--data", data, "--workers", 2, "--quiet", "--no-code-checks"]
    assert cli.main([str(a) for a in [*base, "--output", tmp_path / "raw.json"]]) == 0
    assert json.loads((tmp_path / "raw.json").read_text())["pass@1"] == 0.0  # markdown is not Python
    results = tmp_path / "res.jsonl"
    argv = [*base, "--sanitize", "--output", tmp_path / "san.json", "--results", results]
    assert cli.main([str(a) for a in argv]) == 0
    report = json.loads((tmp_path / "san.json").read_text())
    assert report["pass@1"] == 1.0 and report["sanitize"] is True
    record = json.loads(results.read_text().splitlines()[0])
    assert record["run"]["sanitize"] is True and "```" not in record["solution"] and "print" not in record["solution"]
    capsys.readouterr()
    # a results file holds one run: the same samples unsanitized are refused, in one line
    assert cli.main([str(a) for a in [*base, "--results", results]]) == 1
    assert "another run" in capsys.readouterr().err


def test_sanitize_refuses_infilling(capsys, tmp_path):
    data = write_jsonl_gz(tmp_path / "inf.jsonl.gz", INFILL_LIKE)
    samples = write_samples(tmp_path / "s.jsonl", {p["task_id"]: p["canonical_solution"] for p in INFILL_LIKE})
    with pytest.raises(ValueError, match="not to the infilling task"):
        evaluate("infill-single-line", samples=samples, data=data, settings=EvalSettings(sanitize=True), progress=False)
    code = cli.main(["eval", "infill-single-line", "--samples", str(samples), "--data", str(data), "--sanitize", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--sanitize applies to completion tasks" in err

"""Tiny benchmark files in the real schemas, written by the tests (the real data is never committed)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benchmarks"

ADD_PROMPT = 'def add(a, b):\n    """Return a + b.\n    >>> add(1, 2)\n    3\n    """\n'
ADD_TEST = "\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
HALF_PROMPT = 'def half(x):\n    """Return x / 2.\n    >>> half(3)\n    1.5\n    """\n'
HALF_TEST = "\n\ndef check(candidate):\n    assert candidate(3) == 1.5\n    assert candidate(0) == 0\n"

HUMANEVAL_LIKE = [
    {"task_id": "Tiny/0", "prompt": ADD_PROMPT, "entry_point": "add", "canonical_solution": "    return a + b\n",
     "test": ADD_TEST},
    {"task_id": "Tiny/1", "prompt": HALF_PROMPT, "entry_point": "half", "canonical_solution": "    return x / 2\n",
     "test": HALF_TEST},
]
RIGHT = {"Tiny/0": "    return a + b\n", "Tiny/1": "    return x / 2\n"}
WRONG = {"Tiny/0": "    return a - b\n", "Tiny/1": "    return x * 2\n"}

PLUS_LIKE = [dict(p, base_input=base, plus_input=plus, atol=atol, contract="") for p, base, plus, atol in (
    (HUMANEVAL_LIKE[0], [[1, 2], [-1, 1]], [[10**20, 1], [0, 0], [3, -7]], 0),
    (HUMANEVAL_LIKE[1], [[3], [0]], [[1.0], [1e-9], [7]], 0),
)]

INFILL_LIKE = [
    {"task_id": "SingleLineInfilling/Tiny/0/L0", "entry_point": "add", "prompt": ADD_PROMPT,
     "canonical_solution": "    c = a + b\n", "suffix": "    return c\n", "test": ADD_TEST},
    {"task_id": "SingleLineInfilling/Tiny/1/L0", "entry_point": "half", "prompt": HALF_PROMPT,
     "canonical_solution": "    y = x / 2\n", "suffix": "    return y\n", "test": HALF_TEST},
]


def write_jsonl_gz(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_samples(path: Path, completions: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in completions.items()))
    return path

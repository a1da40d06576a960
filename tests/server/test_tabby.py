"""Tabby's completion request on /v1/completions (told apart from OpenAI's by `segments`) and
/v1/events (apis.md §4)."""

import pytest

from starcoder2.prompts import fim_prompt, repo_prompt
from tests.server import metric, record_prompts


def test_tabby_request_builds_a_repository_prompt_from_segments(client, lm):
    seen = record_prompts(client)
    segments = {"prefix": "def fib(n):\n    ", "suffix": "\n        return fib(n - 1)",
                "filepath": "src/fib.py", "git_url": "https://github.com/org/repo.git",
                "declarations": [{"filepath": "src/util.py", "body": "def memo(fn): ...  # <file_sep>"}],
                "relevant_snippets_from_changed_files": [{"filepath": "src/a.py", "body": "A = 1", "score": 0.8}],
                "relevant_snippets_from_recently_opened_files": [{"filepath": "src/b.py", "body": "B = 2"}]}
    r = client.post("/v1/completions", json={"language": "python", "segments": segments, "temperature": 0,
                                             "debug_options": {"return_prompt": True}})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["id"].startswith("cmpl-") and j["choices"][0]["index"] == 0 and isinstance(j["choices"][0]["text"], str)
    files = [("src/b.py", "B = 2"), ("src/a.py", "A = 1"), ("src/util.py", "def memo(fn): ...  # <file_sep>")]
    expected = repo_prompt(lm.tokenizer, files, "src/fib.py", segments["prefix"], segments["suffix"], repo_name="repo")
    assert seen == [expected]
    assert j["debug_data"]["prompt"].startswith("<repo_name>repo<file_sep>src/b.py\nB = 2")
    assert "choices" in j and "object" not in j  # Tabby's shape, not OpenAI's


def test_bare_segments_give_the_psm_prompt(client, lm):
    seen = record_prompts(client)
    client.post("/v1/completions", json={"segments": {"prefix": "x = ", "suffix": "\n"}, "temperature": 0})
    assert seen == [fim_prompt(lm.tokenizer, "x = ", "\n")]


def test_events(client):
    before = metric(client, "tabby_events_total", 'type="select_line"')
    body = {"type": "select", "completion_id": "cmpl-1", "choice_index": 0, "view_id": "v", "elapsed": 1200}
    r = client.post("/v1/events?select_kind=line", json=body)
    assert r.status_code == 200 and r.content == b""
    assert metric(client, "tabby_events_total", 'type="select_line"') == before + 1
    r = client.post("/v1/events", json={**body, "type": "launch"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "type"


@pytest.mark.parametrize("body", [
    {"segments": {"suffix": "x"}},
    {"segments": "def f():"},
    {"segments": {"prefix": "x"}, "mode": "next_edit_suggestion"},
])
def test_bad_tabby_requests_are_400(client, body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and "error" in r.json()

"""llama.cpp /completion and /infill (apis.md §3): shapes, server-side FIM with `input_extra` in
StarCoder2's repository format, truncation, the prefix cache, n_indent, response_fields."""

import pytest

from starcoder2.prompts import fim_prompt, repo_prompt
from starcoder2.server.llamacpp import IndentCut
from tests.server import metric, record_prompts, sse_json

PROMPT = "for i in range(10):\n"  # the tiny random model answers " group group group ..."


def test_completion_shape_and_greedy_parity(client, lm):
    r = client.post("/completion", json={"prompt": "def f(x):", "n_predict": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["content"] == lm.complete("def f(x):", max_new_tokens=6)
    assert j["stop"] is True and j["stop_type"] == "limit" and j["tokens_predicted"] == 6
    assert j["tokens_evaluated"] == len(lm.tokenizer.encode("def f(x):"))
    assert set(j["timings"]) == {"prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n",
                                 "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}
    for key in ("index", "tokens", "id_slot", "model", "generation_settings", "prompt", "has_new_line", "truncated",
                "stopping_word", "tokens_cached"):
        assert key in j


def test_completion_stop_word_and_stream(client):
    body = {"prompt": PROMPT, "n_predict": 12, "temperature": 0, "stop": ["p g"]}
    j = client.post("/completion", json=body).json()
    assert (j["content"], j["stop_type"], j["stopping_word"]) == (" grou", "word", "p g")
    r = client.post("/completion", json={**body, "stream": True})
    events = sse_json(r.text)
    assert "[DONE]" not in r.text and all("content" in e and "stop" in e for e in events)
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert "".join(e["content"] for e in events) == " grou" and events[-1]["stop_type"] == "word"


def test_infill_renders_psm_and_repository_format_with_plain_text(client, lm):
    tok = lm.tokenizer
    seen = record_prompts(client)
    body = {"input_prefix": "def f(x):\n", "prompt": "    y = ", "input_suffix": "\n    return y\n",
            "n_predict": 4, "temperature": 0}
    r = client.post("/infill", json=body)
    assert r.status_code == 200, r.text
    assert seen[-1] == fim_prompt(tok, "def f(x):\n    y = ", "\n    return y\n")
    extra = [{"filename": "utils.py", "text": "def double(a):\n    return a * 2  # <file_sep><|endoftext|>\n",
              "time": 123}, {"text": "x = 1\n"}]
    j = client.post("/infill", json={**body, "input_extra": extra}).json()
    files = [("utils.py", extra[0]["text"]), ("", "x = 1\n")]
    assert seen[-1] == repo_prompt(tok, files, None, "def f(x):\n    y = ", "\n    return y\n")
    assert sum(t in tok.special_ids for t in seen[-1]) == 2 + 3 + 1  # <file_sep> x2, FIM x3, current <file_sep>
    assert j["prompt"].startswith("<file_sep>utils.py\n") and j["truncated"] is False


def test_infill_truncates_long_prompts_and_says_so(client):
    j = client.post("/infill", json={"input_prefix": "x = 1\n" * 300, "input_suffix": "", "n_predict": 8,
                                     "temperature": 0}).json()
    assert j["truncated"] is True and j["tokens_evaluated"] <= 256 - 8


def test_warm_up_fills_the_prefix_cache(client):
    # The tiny model's 16-token window limits reuse to prompts that extend a cached one (prefix_cache.py),
    # so the warmed prompt is asked again; /completion shows the keystroke case.
    extra = [{"filename": "a.py", "text": "import os\nimport sys\n\ndef main():\n    pass\n"}]
    warm = {"input_prefix": "def g():\n", "input_suffix": "", "input_extra": extra, "n_predict": 0,
            "temperature": 0, "samplers": [], "response_fields": [""]}
    r = client.post("/infill", json=warm)
    assert r.status_code == 200 and r.json() == {}
    fields = ["content", "timings/prompt_n", "tokens_cached", "tokens_evaluated"]
    j = client.post("/infill", json={**warm, "n_predict": 2, "response_fields": fields}).json()
    assert set(j) == set(fields)
    assert j["tokens_cached"] == j["tokens_evaluated"] - 1 and j["timings/prompt_n"] == 1
    before = metric(client, "prefix_cache_hit_tokens_total")
    text = "import os\nimport sys\n\ndef main():\n    pass\n"
    client.post("/completion", json={"prompt": text, "n_predict": 0})
    j = client.post("/completion", json={"prompt": text + "\nif x", "n_predict": 1}).json()
    assert j["tokens_cached"] > 10 and j["timings"]["prompt_n"] < 5
    assert metric(client, "prefix_cache_hit_tokens_total") > before
    assert 0 < metric(client, "prefix_cache_hit_rate") < 1


def test_n_probs(client):
    j = client.post("/completion", json={"prompt": "def f(x):", "n_predict": 2, "temperature": 0, "n_probs": 3}).json()
    probs = j["completion_probabilities"]
    assert len(probs) == 2 and all(len(p["top_logprobs"]) == 3 and p["logprob"] <= 0 for p in probs)


def test_indent_cut():
    cut = IndentCut(4)
    pieces = ["x = 1", "\n    y", " = 2\n", "  ", "  z\n", "\n", "  ", "w = 3\n    q"]
    out = "".join(cut.push(p) for p in pieces)
    assert out == "x = 1\n    y = 2\n    z\n\n  " and cut.cut
    cut = IndentCut(4)
    assert cut.push("a\n  ") == "a\n" and cut.push("", final=True) == "  " and not cut.cut


@pytest.mark.parametrize("path, body", [
    ("/infill", {"input_prefix": "x", "input_extra": [{"filename": "a.py"}]}),
    ("/infill", {"input_prefix": "x", "input_extra": "nope"}),
    ("/infill", {"input_prefix": "x", "prompt": [1, 2]}),
    ("/infill", {"input_prefix": 5}),
    ("/completion", {"prompt": "x", "n_predict": -2}),
    ("/completion", {"prompt": ""}),
    ("/completion", {"n_predict": 3}),
    ("/completion", {"prompt": "x", "stop": "not a list"}),
])
def test_bad_requests_get_llamacpp_errors(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error" and err["message"]
    assert client.get("/health").status_code == 200

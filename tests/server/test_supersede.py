"""Superseding: a newer request with the same X-Client-Id cancels the older unfinished one (live
uvicorn). The older one ends at once with a 409 in its API family's shape (or an in-band error
event when it streams), its engine row is freed, and the newer one completes as if alone."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from starcoder2 import load
from starcoder2.prompts import default_stop_ids
from starcoder2.server import create_app
from tests.server import live_server, metric, slow_down

PROMPT = "for i in range(10):\n"
LONG = 200  # tokens; at 20 ms a step the older request would run 4 s


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    """The tiny model with its stop tokens made unreachable: the older request must still be
    generating when the newer one arrives, and this random model's greedy infill ends at once with
    a stop token (on which CPUs depends on float rounding)."""
    lm = load(tiny_checkpoint, dtype="fp32")
    head = lm.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features)  # (V, C) weight shared, (V,) bias
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[default_stop_ids(lm.tokenizer)] = -1e9
    lm.model.lm_head = biased
    return lm


@pytest.fixture
def served(lm):
    app = create_app(lm)
    slow_down(app, 0.02)
    with live_server(app) as port:
        yield app.state.server, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def body(path: str, n: int, stream: bool = False) -> dict:
    if path == "/generate":
        return {"inputs": PROMPT, "parameters": {"max_new_tokens": n}}
    if path == "/infill":
        return {"input_prefix": PROMPT, "input_suffix": "", "n_predict": n, "temperature": 0, "stream": stream}
    return {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": stream}


def assert_all_freed(state):
    wait_until(lambda: state.in_flight == 0 and not state.engine.running and not state.engine.waiting)
    assert not state.clients and not state.live


@pytest.mark.parametrize("path", ["/v1/completions", "/generate", "/infill"])
def test_newer_request_supersedes_the_older_one(served, lm, path):
    state, http = served
    headers = {"X-Client-Id": "editor-1"}
    with ThreadPoolExecutor(1) as pool:
        older = pool.submit(http.post, path, json=body(path, LONG), headers=headers)
        wait_until(lambda: state.engine.running)
        old_request = state.clients["editor-1"].choices[0].request
        newer = http.post(path, json=body(path, 5), headers=headers)
        old = older.result()
    assert newer.status_code == 200, newer.text
    text = {"/generate": "generated_text", "/infill": "content"}.get(path)
    expected = lm.complete(PROMPT, max_new_tokens=5) if path != "/infill" else lm.infill(PROMPT, "", max_new_tokens=5)
    assert (newer.json()[text] if text else newer.json()["choices"][0]["text"]) == expected
    assert old.status_code == 409, old.text
    err = old.json()
    assert {"/generate": lambda: err["error_type"] == "superseded",
            "/infill": lambda: err["error"]["code"] == 409,
            "/v1/completions": lambda: err["error"]["code"] == "superseded"}[path]()
    assert "X-Client-Id" in json.dumps(err)
    assert old_request.finish_reason == "cancelled" and len(old_request.output) < LONG
    assert_all_freed(state)
    metrics = http.get("/metrics").text
    assert "starcoder2_superseded_requests_total 1\n" in metrics
    assert 'starcoder2_generations_total{finish_reason="superseded"} 1\n' in metrics


def test_a_superseded_stream_ends_with_an_error_event(served, lm):
    state, http = served
    headers = {"X-Client-Id": "vim-42"}
    with http.stream("POST", "/v1/completions", json=body("/v1/completions", LONG, stream=True),
                     headers=headers) as old:
        lines = old.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        newer = http.post("/v1/completions", json=body("/v1/completions", 5, stream=True), headers=headers)
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert old.status_code == 200
    events = [json.loads(p) for p in rest]
    assert events[-1]["error"]["code"] == "superseded" and "[DONE]" not in rest
    assert sum(1 for e in events if "choices" in e) < LONG
    new_events = [json.loads(p[6:]) for p in newer.text.split("\n\n") if p.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in new_events) == lm.complete(PROMPT, max_new_tokens=5)
    assert newer.text.endswith("data: [DONE]\n\n")
    assert_all_freed(state)


def test_other_ids_and_requests_without_an_id_are_left_alone(served, lm):
    state, http = served
    jobs = [{"X-Client-Id": "a"}, {"X-Client-Id": "b"}, {}, {}]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda h: http.post("/v1/completions", json=body("/v1/completions", 12),
                                                    headers=h), jobs))
    expected = lm.complete(PROMPT, max_new_tokens=12)
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] == expected for r in results)
    assert metric(http, "superseded_requests_total") == 0
    assert_all_freed(state)


def test_a_finished_request_is_not_superseded_and_a_long_id_is_rejected(served):
    state, http = served
    headers = {"X-Client-Id": "c"}
    for _ in range(2):
        r = http.post("/v1/completions", json=body("/v1/completions", 2), headers=headers)
        assert r.status_code == 200
    assert metric(http, "superseded_requests_total") == 0
    r = http.post("/v1/completions", json=body("/v1/completions", 2), headers={"X-Client-Id": "x" * 300})
    assert r.status_code == 400 and "X-Client-Id" in r.json()["error"]["message"]
    assert_all_freed(state)

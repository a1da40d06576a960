"""TGI /generate, /generate_stream, / and /info (apis.md §2)."""

import pytest

from tests.server import record_prompts, sse_json

PROMPT = "for i in range(10):\n"  # the tiny random model answers " group group group ..."


def test_generate_is_greedy_by_default_and_matches_loaded_model(client, lm):
    r = client.post("/generate", json={"inputs": "def f(x):", "parameters": {"max_new_tokens": 7}})
    assert r.status_code == 200, r.text
    assert r.json() == {"generated_text": lm.complete("def f(x):", max_new_tokens=7)}
    assert r.headers["x-generated-tokens"] == "7"
    assert r.headers["x-prompt-tokens"] == str(len(lm.tokenizer.encode("def f(x):")))


def test_inputs_are_raw_special_token_text_becomes_tokens(client, lm):
    raw = "<fim_prefix>def f(x):<fim_suffix>\n<fim_middle>"
    seen = record_prompts(client)
    client.post("/generate", json={"inputs": raw, "parameters": {"max_new_tokens": 2}})
    assert seen == [lm.tokenizer.encode(raw, allow_special=True)]
    assert seen[0][0] == lm.tokenizer.fim_prefix_id


def test_details_stop_sequences_and_full_text(client, lm):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 12, "stop": ["p g"], "details": True, "return_full_text": True, "top_n_tokens": 2,
        "decoder_input_details": True}})
    j = r.json()
    assert j["generated_text"] == PROMPT + " grou"
    d = j["details"]
    assert d["finish_reason"] == "stop_sequence" and d["generated_tokens"] == len(d["tokens"]) == 2
    assert [t["text"] for t in d["tokens"]] == [" group", " group"]
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in d["tokens"])
    assert len(d["top_tokens"]) == 2 and all(len(top) == 2 for top in d["top_tokens"])
    assert [t["id"] for t in d["prefill"]] == lm.tokenizer.encode(PROMPT)
    r = client.post("/generate", json={"inputs": "def f(x):", "parameters": {"max_new_tokens": 3, "details": True}})
    assert r.json()["details"]["finish_reason"] == "length"


def test_generate_stream_events(client, lm):
    r = client.post("/generate_stream", json={"inputs": "def f(x):", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text
    events = sse_json(r.text)
    expected = lm.complete("def f(x):", max_new_tokens=5)
    assert [e["index"] for e in events] == list(range(len(events)))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert all(isinstance(e["token"]["logprob"], float) for e in events)  # text-generation needs floats
    last = events[-1]
    assert last["generated_text"] == expected == "".join(e["token"]["text"] for e in events)
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 5,
                               "input_length": len(lm.tokenizer.encode("def f(x):")), "seed": None}


def test_inference_api_root_returns_a_list_or_a_stream(client, lm):
    body = {"inputs": "def f(x):", "parameters": {"max_new_tokens": 4}}
    assert client.post("/", json=body).json() == [{"generated_text": lm.complete("def f(x):", max_new_tokens=4)}]
    assert client.post("/models/bigcode/starcoder2-3b", json=body).json() == client.post("/", json=body).json()
    events = sse_json(client.post("/", json={**body, "stream": True}).text)
    assert events[-1]["details"]["generated_tokens"] == 4


def test_info(client):
    j = client.get("/info").json()
    assert j["max_total_tokens"] == 256 and j["max_input_tokens"] == 255
    assert j["model_dtype"] == "float32" and j["model_device_type"] == "cpu" and j["max_best_of"] == 1


@pytest.mark.parametrize("body", [
    {"parameters": {}},
    {"inputs": ""},
    {"inputs": 3},
    {"inputs": "x", "parameters": {"max_new_tokens": -1}},
    {"inputs": "x", "parameters": {"temperature": 0}},
    {"inputs": "x", "parameters": {"best_of": 2}},
    {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {}}}},
    {"inputs": "x", "parameters": "nope"},
])
def test_bad_requests_get_tgi_errors(client, body):
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and isinstance(r.json()["error"], str)
    assert client.get("/health").status_code == 200

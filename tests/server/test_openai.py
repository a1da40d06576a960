"""OpenAI /v1/completions and /v1/models against the tiny checkpoint: shapes (apis.md §1), parity
with LoadedModel, FIM from `suffix`, raw vs structured tokenization, stop strings, streaming."""

import pytest

from starcoder2 import load
from starcoder2.prompts import default_stop_ids, fim_prompt
from tests.server import make_client, record_prompts, sse_json, sse_payloads

PROMPT = "for i in range(10):\n"  # the tiny random model answers " group group group ..."


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return load(tiny_checkpoint, dtype="fp32")


@pytest.fixture(scope="module")
def client(lm):
    with make_client(lm, model_name="tiny") as c:
        yield c


def greedy(lm, ids: list[int], n: int) -> str:
    """The reference: LoadedModel.generate cut at the server's stop ids (FIM tokens, <file_sep>, ...)."""
    out, stops = lm.generate(ids, max_new_tokens=n), set(default_stop_ids(lm.tokenizer))
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    return lm.tokenizer.decode(out[:cut])


def post(client, **body):
    return client.post("/v1/completions", json={"model": "tiny", "temperature": 0, **body})


def test_greedy_completion_equals_loaded_model_and_has_openai_shape(client, lm):
    r = post(client, prompt="def f(x):", max_tokens=10)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "text_completion" and j["id"].startswith("cmpl-") and j["model"] == "tiny"
    assert isinstance(j["created"], int)
    (choice,) = j["choices"]
    assert choice == {"text": lm.complete("def f(x):", max_new_tokens=10), "index": 0, "logprobs": None,
                      "finish_reason": "length"}
    n_prompt = len(lm.tokenizer.encode("def f(x):"))
    assert j["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 10, "total_tokens": n_prompt + 10}


def test_default_max_tokens_is_16(client):
    assert post(client, prompt="def f(x):").json()["usage"]["completion_tokens"] == 16


def test_suffix_becomes_the_starcoder2_fim_prompt_with_plain_text(client, lm):
    prefix, suffix = "def f(x):\n    <file_sep>", "\n<fim_middle>    return y\n"
    seen = record_prompts(client)
    r = post(client, prompt=prefix, suffix=suffix, max_tokens=6)
    assert r.status_code == 200, r.text
    assert seen == [fim_prompt(lm.tokenizer, prefix, suffix)]
    special = lm.tokenizer.special_ids
    assert sum(t in special for t in seen[0]) == 3  # only the three FIM sentinels
    assert r.json()["choices"][0]["text"] == lm.infill(prefix, suffix, max_new_tokens=6)


def test_raw_prompt_turns_special_token_text_into_special_tokens(client, lm):
    raw = "<fim_prefix>def f(x):<fim_suffix>\n<fim_middle>"
    seen = record_prompts(client)
    r = post(client, prompt=raw, max_tokens=5)
    ids = lm.tokenizer.encode(raw, allow_special=True)
    assert seen == [ids] and ids[0] == lm.tokenizer.fim_prefix_id and ids[-1] == lm.tokenizer.fim_middle_id
    assert r.json()["choices"][0]["text"] == greedy(lm, ids, 5)


def test_prompt_lists_n_and_token_ids(client, lm):
    ids = lm.tokenizer.encode("def f(x):")
    r = post(client, prompt=["def f(x):", PROMPT], n=2, max_tokens=4)
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] == choices[1]["text"] == lm.complete("def f(x):", max_new_tokens=4)
    assert choices[2]["text"] == choices[3]["text"] == lm.complete(PROMPT, max_new_tokens=4)
    assert post(client, prompt=ids, max_tokens=4).json()["choices"][0]["text"] == choices[0]["text"]
    r = post(client, prompt=[ids, ids], max_tokens=4)
    assert [c["text"] for c in r.json()["choices"]] == [choices[0]["text"]] * 2


def test_stop_strings_are_honoured_and_not_returned(client, lm):
    full = lm.complete(PROMPT, max_new_tokens=12)
    assert full.startswith(" group group")
    r = post(client, prompt=PROMPT, max_tokens=12, stop=["p g"])  # spans two tokens
    assert r.json()["choices"][0] == {"text": " grou", "index": 0, "logprobs": None, "finish_reason": "stop"}
    r = post(client, prompt=PROMPT, max_tokens=12, stop="p g", stream=True)
    events = sse_json(r.text)
    assert "".join(e["choices"][0]["text"] for e in events) == " grou"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_events_and_done(client, lm):
    r = post(client, prompt="def f(x):", max_tokens=6, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    events = sse_json(r.text)
    *chunks, usage = events
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == lm.complete("def f(x):", max_new_tokens=6)


def test_stream_n_choices_each_finish(client, lm):
    r = post(client, prompt="def f(x):", max_tokens=3, stream=True, n=2)
    events = sse_json(r.text)
    for i in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == lm.complete("def f(x):", max_new_tokens=3)
        assert mine[-1]["finish_reason"] == "length"


def test_echo_and_logprobs(client, lm):
    r = post(client, prompt="def f(x):", max_tokens=3, echo=True)
    assert r.json()["choices"][0]["text"] == "def f(x):" + lm.complete("def f(x):", max_new_tokens=3)
    r = post(client, prompt="def f(x):", max_tokens=3, logprobs=2)
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 3
    assert all(v <= 0 for v in lp["token_logprobs"]) and lp["text_offset"][0] == 0
    # Greedy picks the most likely token: its logprob is the largest of the alternatives.
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[tok] == value and value == pytest.approx(max(top.values()))
    assert post(client, prompt="x", suffix="y", echo=True, logprobs=1).status_code == 400


def test_echo_with_logprobs_scores_the_prompt_like_a_float64_forward(client, lm):
    import copy

    import torch

    prompt = "def f(x):\n    return x"
    ids = lm.tokenizer.encode(prompt)
    ref_model = copy.deepcopy(lm.model).double()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids]))[0].log_softmax(-1)  # (T, V) float64
    want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
    r = post(client, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    best = [v for t in range(1, len(ids)) for v in ref[t - 1].topk(2).values.tolist()]
    got = [v for top in lp["top_logprobs"][1:] for v in sorted(top.values(), reverse=True)[:2]]
    assert got == pytest.approx(best, abs=1e-4)
    # With generation: the prompt part, then the generated tokens; streaming puts it on the echo chunk.
    r = post(client, prompt=prompt, max_tokens=3, echo=True, logprobs=0)
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3 and lp["text_offset"][len(ids)] == len(prompt)
    events = sse_json(post(client, prompt=prompt, max_tokens=2, echo=True, logprobs=1, stream=True).text)
    assert events[0]["choices"][0]["text"] == prompt
    assert events[0]["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)


def test_seeded_sampling_is_reproducible(client):
    a = post(client, prompt="def f(x):", max_tokens=8, temperature=1.0, seed=7).json()["choices"][0]["text"]
    b = post(client, prompt="def f(x):", max_tokens=8, temperature=1.0, seed=7).json()["choices"][0]["text"]
    assert a == b


def test_llm_ls_parameters_fill_absent_fields(client, lm):
    r = post(client, prompt="def f(x):", parameters={"max_new_tokens": 5, "temperature": 0.2, "top_p": 0.95})
    assert r.json()["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "model": 3}, "model"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": "x " * 400}, "prompt"),  # longer than the 256-token context
    ({"prompt": [10**6]}, "prompt"),
    ({}, "prompt"),
])
def test_bad_requests_get_openai_errors(client, body, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert client.get("/health").json() == {"status": "ok"}


def test_models(client):
    j = client.get("/v1/models").json()
    assert j["object"] == "list" and [m["id"] for m in j["data"]] == ["tiny"]
    assert j["data"][0]["object"] == "model" and j["data"][0]["owned_by"]

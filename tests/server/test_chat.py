"""POST /v1/chat/completions: OpenAI's shape, the template's rendering, streaming, errors; with
TestClient and with the official `openai` client against a live server."""

import json
import shutil

import openai
import pytest
import torch

from starcoder2 import load
from starcoder2.chat import DEFAULT_CHAT_TEMPLATE, chat_prompt, save_chat_template
from starcoder2.server import create_app
from tests.server import live_server, make_client, sse_json
from tests.test_chat import STARCODER2_INSTRUCT

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]


def _with_template(tmp_path_factory, tiny_checkpoint, template: str):
    out = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_checkpoint, out)
    save_chat_template(out, template)
    return out


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory, tiny_checkpoint):
    return load(_with_template(tmp_path_factory, tiny_checkpoint, DEFAULT_CHAT_TEMPLATE), dtype="fp32")


@pytest.fixture(scope="module")
def chat_client(chat_lm):
    with make_client(chat_lm, model_name="tiny-chat") as c:
        yield c


def test_greedy_answer_equals_reference(chat_client, chat_lm):
    r = chat_client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny-chat"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["index"] == 0
    assert choice["message"]["content"] == chat_lm.chat(MESSAGES, max_new_tokens=12)  # the reference generate()
    assert choice["finish_reason"] in ("stop", "length")
    prompt = chat_prompt(chat_lm.chat_template(), chat_lm.tokenizer, MESSAGES)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["total_tokens"] == len(prompt) + body["usage"]["completion_tokens"]


def test_stream_chunks(chat_client):
    req = {"messages": MESSAGES, "max_completion_tokens": 10, "temperature": 0, "n": 2,
           "stream_options": {"include_usage": True}}
    full = chat_client.post("/v1/chat/completions", json=req).json()
    r = chat_client.post("/v1/chat/completions", json={**req, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = sse_json(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    for i in range(2):
        mine = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}  # the role comes first
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == full["choices"][i]["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == full["choices"][i]["message"]["content"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]


def test_end_of_turn_token_stops(tmp_path_factory, tiny_checkpoint):
    """A model whose every next token is eos answers empty, finish "stop", well before max_tokens."""
    lm = load(_with_template(tmp_path_factory, tiny_checkpoint, DEFAULT_CHAT_TEMPLATE), dtype="fp32")
    with torch.no_grad():  # final LayerNorm outputs 1000 E[eos]: logits 1000 E[eos] . E[v], largest for eos
        lm.model.norm.weight.zero_()
        lm.model.norm.bias.copy_(1000 * lm.model.embed_tokens.weight[lm.tokenizer.eos_id])
    with make_client(lm) as c:
        body = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 20, "temperature": 0}).json()
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["message"]["content"] == ""
    assert body["usage"]["completion_tokens"] == 0


def test_text_parts_and_stop_strings(chat_client, chat_lm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "def add"}, {"type": "text", "text": "(a, b):"}]}]
    r = chat_client.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 6, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == chat_lm.chat(
        [{"role": "user", "content": "def add\n(a, b):"}], max_new_tokens=6)
    full = r.json()["choices"][0]["message"]["content"]
    if len(full) > 2:  # a stop string taken from the answer cuts it there
        r = chat_client.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 6, "temperature": 0,
                                                           "stop": full[2:4]})
        assert r.json()["choices"][0]["message"]["content"] == full[:2]


@pytest.mark.parametrize("body, status, match", [
    ({"messages": []}, 400, "messages"),
    ({"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": MESSAGES, "temperature": 3}, 400, "temperature"),
    ({"messages": MESSAGES, "logprobs": True}, 400, "logprobs"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "text"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "Unknown role: tool"),  # the template's raise_exception
    ({"messages": MESSAGES, "max_tokens": 10**6}, 400, "context"),
])
def test_bad_requests_are_openai_errors(chat_client, body, status, match):
    r = chat_client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and match in err["message"]
    assert chat_client.get("/health").status_code == 200


def test_base_model_is_a_400(client):
    """The conftest's tiny checkpoint has no chat template."""
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "chat_template_missing" and err["param"] == "messages"
    assert "has no chat template: it is a base (completion) model; use /v1/completions" in err["message"]
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_template_refusing_system_messages(tmp_path_factory, tiny_checkpoint):
    lm = load(_with_template(tmp_path_factory, tiny_checkpoint, STARCODER2_INSTRUCT), dtype="fp32")
    with make_client(lm) as c:
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
        assert r.status_code == 400 and "System messages are not allowed" in r.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json={"messages": MESSAGES[1:], "max_tokens": 2}).status_code == 200


def test_official_openai_client(chat_lm, lm):
    expected = chat_lm.chat(MESSAGES, max_new_tokens=8)
    with live_server(create_app(chat_lm, model_name="tiny-chat")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=30)
        r = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0, seed=1)
        assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(chat_prompt(chat_lm.chat_template(), chat_lm.tokenizer, MESSAGES))
        stream = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0,
                                                stream=True)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    with live_server(create_app(lm)) as port:  # a base model: the client raises the 400 with our message
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError, match="has no chat template") as e:
            client.chat.completions.create(model="x", messages=MESSAGES)
        assert json.loads(e.value.response.text)["error"]["code"] == "chat_template_missing"

"""The app around the routes: utilities, API keys, limits, errors, metrics, concurrency, client
disconnects (against a live uvicorn), and the `serve` command's parser."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from starcoder2 import cli, load
from starcoder2.server import app as app_module, create_app
from tests.server import live_server, make_client, metric, slow_down, sse_json

PROMPTS = ["def f(x):", "for i in range(10):\n", "import os\n", "x = 1\ny = ", "class A:\n    pass\n"]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return load(tiny_checkpoint, dtype="fp32")


@pytest.fixture(scope="module")
def client(lm):
    with make_client(lm, max_batch=3) as c:
        yield c


def complete(client, prompt, n=8):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---- utilities -----------------------------------------------------------------------------------------

def test_tokenize_and_detokenize(client, lm):
    tok = lm.tokenizer
    text = "<fim_prefix>x = 1<file_sep>"
    assert client.post("/tokenize", json={"content": text}).json() == {"tokens": tok.encode(text, allow_special=True)}
    plain = client.post("/tokenize", json={"content": text, "parse_special": False}).json()["tokens"]
    assert plain == tok.encode(text) and not set(plain) & tok.special_ids
    pieces = client.post("/tokenize", json={"content": "x = 1", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "x = 1"
    tgi = client.post("/tokenize", json={"inputs": "x = 1"}).json()
    assert [t["id"] for t in tgi] == tok.encode("x = 1") and tgi[-1]["stop"] == 5
    ids = tok.encode(text, allow_special=True)
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"content": text}
    r = client.post("/detokenize", json={"tokens": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_health_and_playground(client, monkeypatch, tmp_path):
    assert client.get("/health").json() == {"status": "ok"}
    page = tmp_path / "playground.html"
    page.write_text("<!doctype html><title>play</title>")
    monkeypatch.setattr(app_module, "PLAYGROUND", page)
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "play" in r.text
    monkeypatch.setattr(app_module, "PLAYGROUND", tmp_path / "missing.html")
    r = client.get("/")
    assert r.status_code == 200 and "v1/completions" in r.text


def test_metrics_move(client):
    before = {k: metric(client, k) for k in ("generated_tokens_total", "prompt_tokens_total",
                                              "time_to_first_token_seconds_count")}
    complete(client, "def f(x):", 5)
    assert metric(client, "generated_tokens_total") == before["generated_tokens_total"] + 5
    assert metric(client, "prompt_tokens_total") > before["prompt_tokens_total"]
    assert metric(client, "time_to_first_token_seconds_count") == before["time_to_first_token_seconds_count"] + 1
    assert metric(client, "http_requests_total", 'method="POST",route="/v1/completions",status="200"') >= 1
    text = client.get("/metrics").text
    for line in text.splitlines():  # every sample is `name{labels} number`
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
    assert "starcoder2_queue_depth 0" in text and "# TYPE starcoder2_time_to_first_token_seconds histogram" in text


# ---- errors and limits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"{", b'{"prompt": "\xff\xfe"}', b"[1, 2]", b"null", b""])
def test_malformed_bodies_are_400_json(client, content):
    r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/health").status_code == 200


def test_body_size_limit(lm):
    with make_client(lm, max_body_bytes=1000) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * 2000})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = c.post("/generate", content=iter([b'{"inputs": "', b"x" * 2000, b'"}']),
                   headers={"content-type": "application/json"})  # chunked: no content-length
        assert r.status_code == 413 and r.json()["error_type"] == "validation"
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_api_key(lm):
    with make_client(lm, api_key="s3cret", cors_origins=["*"]) as c:
        body = {"prompt": "x", "max_tokens": 1}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "s3cret" not in r.text
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/completions", json=body, headers={"x-api-key": "s3cret"}).status_code == 200
        r = c.post("/generate", json={"inputs": "x"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error_type"] == "authentication"
        r = c.post("/infill", json={"input_prefix": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        r = c.options("/v1/completions", headers={"Origin": "http://example.com",
                                                  "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://example.com")


def test_overload_is_429_with_retry_after(lm):
    with make_client(lm, max_batch=1, max_queue=0) as c:
        slow_down(c, 0.05)
        state = c.app.state.server
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(c.post, "/v1/completions", json={"prompt": "x", "max_tokens": 20, "temperature": 0})
            wait_until(lambda: state.in_flight == 1)
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            r = c.post("/generate", json={"inputs": "x"})
            assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
            assert busy.result().status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_request_time_limit_ends_with_length(lm):
    with make_client(lm, request_timeout_s=0.3) as c:
        slow_down(c, 0.03)
        t0 = time.monotonic()
        j = c.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 200, "temperature": 0}).json()
        assert time.monotonic() - t0 < 3
        assert j["choices"][0]["finish_reason"] == "length" and 0 < j["usage"]["completion_tokens"] < 200


# ---- concurrency ---------------------------------------------------------------------------------------

def test_concurrent_requests_match_sequential_greedy(client):
    jobs = [(p, n) for p in PROMPTS for n in (3, 9)]
    sequential = [complete(client, p, n) for p, n in jobs]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda job: complete(client, *job), jobs))
    assert concurrent == sequential
    state = client.app.state.server
    assert state.in_flight == 0 and not state.live
    wait_until(lambda: not state.engine.running)  # finished rows leave at the engine's next step


# ---- client disconnects (live server) -----------------------------------------------------------------

def _post_raw(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(lm, stream):
    app = create_app(lm)
    slow_down(app, 0.02)  # 500 tokens would take 10 s
    state = app.state.server
    with live_server(app) as port:
        s = _post_raw(port, {"prompt": "def f(x):", "max_tokens": 200, "temperature": 0, "stream": stream})
        if stream:
            received = b""
            while b"data: " not in received:
                received += s.recv(65536)
        else:
            wait_until(lambda: state.engine.running)
        t0 = time.monotonic()
        s.close()
        wait_until(lambda: state.in_flight == 0 and not state.engine.running)
        assert time.monotonic() - t0 < 2
        assert state.metrics.generations["cancelled"] == 1
        with socket.create_connection(("127.0.0.1", port)) as s2:  # still serving
            s2.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            assert s2.recv(4096).startswith(b"HTTP/1.1 200")


def test_stream_over_a_live_server(lm):
    import httpx

    app = create_app(lm)
    with live_server(app) as port:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                          json={"prompt": "def f(x):", "max_tokens": 5, "temperature": 0, "stream": True}) as r:
            text = "".join(r.iter_text())
    events = sse_json(text)
    assert text.endswith("data: [DONE]\n\n")
    assert "".join(e["choices"][0]["text"] for e in events) == lm.complete("def f(x):", max_new_tokens=5)


# ---- the serve command ---------------------------------------------------------------------------------

def test_serve_command_parses_and_rejects_an_empty_key_file(tmp_path, capsys):
    args = cli.build_parser().parse_args(["serve", "--model", "m", "--port", "9000", "--api-key-file", "k",
                                          "--max-batch", "4", "--quantize", "int8"])
    assert (args.func, args.port, args.host, args.max_batch, args.quantize) == (cli.cmd_serve, 9000, "127.0.0.1",
                                                                                4, "int8")
    (tmp_path / "key").write_text("\n")
    assert cli.main(["serve", "--model", "m", "--api-key-file", str(tmp_path / "key")]) == 1
    assert "holds no API key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--api-key", "a", "--api-key-file", "b"])


def test_an_engine_failure_is_a_500_and_the_server_keeps_serving(lm):
    with make_client(lm) as c:
        engine = c.app.state.server.engine
        decode, calls = engine._decode, []

        def failing_decode():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("device lost")
            decode()

        engine._decode = failing_decode
        r = c.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        events = sse_json(c.post("/completion", json={"prompt": "x", "n_predict": 3, "stream": True}).text)
        assert events[-1]["stop"] is True
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200
        assert metric(c, "generations_total", 'finish_reason="error"') == 1


def test_draft_model_speculation_keeps_greedy_output(lm):
    """serve --draft-model: a greedy request running alone is drafted by the second model and
    verified by the first; the text is the plain greedy text, and /metrics counts the drafts."""
    with make_client(lm, draft_model=lm.model, num_draft=4) as client:
        r = client.post("/v1/completions", json={"prompt": "def add(a, b):\n", "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == lm.complete("def add(a, b):\n", max_new_tokens=24)
        drafted = metric(client, "speculative_draft_tokens_total")
        assert drafted > 0 and metric(client, "speculative_accepted_tokens_total") == drafted  # its own guesses

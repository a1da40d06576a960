"""A bounded load test: 16 concurrent clients for ~10 s against a live uvicorn server (tiny model),
mixing OpenAI streaming and non-streaming completions, TGI streams and llama.cpp /infill. Zero
errors; every response well-formed and equal to the model's own greedy output for its prompt; no
request left behind; the process's RSS grows by less than a generous bound after a warm-up (by
then the prefix cache, which grows up to its token budget, holds every prompt; its /metrics gauges
are checked against its entries).
(The full one-minute run with the embedded model is benchmarks/bench_server.py.)
"""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil

from starcoder2.server import create_app
from tests.server import live_server, metric

CLIENTS = 16
WARMUP_S, LOAD_S = 2.0, 6.0
MAX_NEW = 8
RSS_GROWTH_MIB = 100  # generous: allocator noise, not a leak of ~KB per request
PROMPTS = ["def f(x):", "for i in range(10):\n", "import os\n", "x = 1\ny = ", "class A:\n    pass\n"]
KINDS = ["openai-stream", "openai", "tgi-stream", "infill"]


def request(http: httpx.Client, kind: str, prompt: str, client_id: str) -> str:
    """Send one request and return its completion text; raise AssertionError if malformed."""
    headers = {"X-Client-Id": client_id}
    if kind == "infill":
        r = http.post("/infill", json={"input_prefix": prompt, "input_suffix": "", "n_predict": MAX_NEW,
                                       "temperature": 0}, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["stop"] is True and r.json()["tokens_predicted"] <= MAX_NEW
        return r.json()["content"]
    if kind == "openai":
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0},
                      headers=headers)
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        assert choice["finish_reason"] in ("stop", "length")
        return choice["text"]
    path, body = (("/v1/completions", {"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "stream": True})
                  if kind == "openai-stream" else ("/generate_stream", {"inputs": prompt,
                                                                        "parameters": {"max_new_tokens": MAX_NEW}}))
    with http.stream("POST", path, json=body, headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    if kind == "openai-stream":
        assert data[-1] == "[DONE]", data[-3:]
        events = [json.loads(d) for d in data[:-1]]
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        return "".join(e["choices"][0]["text"] for e in events)
    events = [json.loads(d) for d in data]
    assert all("error" not in e for e in events) and events[-1]["details"]["finish_reason"] in ("length", "eos_token")
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"]
    return events[-1]["generated_text"]


def test_sixteen_clients_no_errors_no_leaks(lm):
    expected = {p: lm.complete(p, max_new_tokens=MAX_NEW) for p in PROMPTS}
    expected_infill = {p: lm.infill(p, "", max_new_tokens=MAX_NEW) for p in PROMPTS}
    app = create_app(lm)
    state, process = app.state.server, psutil.Process()
    errors, counts, lock = [], [0, 0], threading.Lock()
    phase = {"measuring": False, "stop_at": 0.0}

    def client(k: int, port: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            i = k
            while time.monotonic() < phase["stop_at"]:
                kind, prompt = KINDS[i % len(KINDS)], PROMPTS[(i // len(KINDS)) % len(PROMPTS)]
                try:
                    text = request(http, kind, prompt, client_id=f"client-{k}")
                    want = expected_infill[prompt] if kind == "infill" else expected[prompt]
                    assert text == want, (kind, prompt, text, want)
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    with lock:
                        errors.append(f"{kind} {prompt!r}: {type(e).__name__}: {e}"[:300])
                with lock:
                    counts[phase["measuring"]] += 1
                i += CLIENTS

    with live_server(app) as port:
        with ThreadPoolExecutor(CLIENTS) as pool:
            phase["stop_at"] = time.monotonic() + WARMUP_S + LOAD_S
            futures = [pool.submit(client, k, port) for k in range(CLIENTS)]
            time.sleep(WARMUP_S)
            rss_start = process.memory_info().rss
            phase["measuring"] = True
            for f in futures:
                f.result()
        rss_end = process.memory_info().rss
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            assert metric(http, "superseded_requests_total") == 0  # one id per sequential client
            cache = state.engine.prefix_cache  # its gauges: the memory that grows up to a budget
            assert metric(http, "prefix_cache_tokens") == cache.tokens > 0
            assert metric(http, "prefix_cache_bytes") == sum(e.k.nbytes + e.v.nbytes for e in cache.entries.values())
            total = sum(metric(http, "generations_total", f'finish_reason="{r}"') for r in ("length", "eos", "stop"))
    assert not errors, f"{len(errors)} errors, e.g. {errors[:3]}"
    assert counts[1] >= CLIENTS  # every client completed requests under load
    assert total == sum(counts)
    assert state.in_flight == 0 and not state.live and not state.clients and not state.engine.waiting
    growth_mib = (rss_end - rss_start) / 2**20
    assert growth_mib < RSS_GROWTH_MIB, f"RSS grew by {growth_mib:.0f} MiB under load"

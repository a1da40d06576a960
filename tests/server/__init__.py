"""Helpers for the server tests: a client over the tiny checkpoint, SSE parsing, a recorder of the
prompts the engine receives, a slowed engine, and a live uvicorn server on a free port."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time

from fastapi.testclient import TestClient

from starcoder2.server import create_app


@contextlib.contextmanager
def make_client(lm, **settings):
    with TestClient(create_app(lm, **settings)) as client:
        yield client


def sse_payloads(text: str) -> list[str]:
    """The `data:` payloads of a text/event-stream body, checking every event ends with a blank line."""
    assert text.endswith("\n\n"), text[-80:]
    out = []
    for event in text.split("\n\n")[:-1]:
        lines = event.split("\n")
        assert all(line.startswith("data:") for line in lines), event
        out.append("\n".join(line[5:].removeprefix(" ") for line in lines))
    return out


def sse_json(text: str) -> list[dict]:
    return [json.loads(p) for p in sse_payloads(text) if p != "[DONE]"]


def record_prompts(client) -> list[list[int]]:
    """Every prompt submitted to the app's engine from now on, in order."""
    engine = client.app.state.server.engine
    seen: list[list[int]] = []
    submit = engine.submit

    def recording(prompt, *args, **kwargs):
        seen.append(list(prompt))
        return submit(prompt, *args, **kwargs)

    engine.submit = recording
    return seen


def slow_down(client_or_app, seconds: float) -> None:
    """Make every engine step take at least `seconds` (requests stay in flight long enough to test)."""
    app = getattr(client_or_app, "app", client_or_app)
    engine = app.state.server.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        step()

    engine.step = slow_step


def metric(client, name: str, labels: str = "") -> float:
    """A sample's value in /metrics (0 when absent)."""
    text = client.get("/metrics").text
    m = re.search(rf"^starcoder2_{name}{re.escape('{' + labels + '}') if labels else ''} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@contextlib.contextmanager
def live_server(app):
    """uvicorn serving `app` on 127.0.0.1 on a free port, in a thread; yields the port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(20)

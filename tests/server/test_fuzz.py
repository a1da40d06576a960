"""Fuzzing the served OpenAPI document with schemathesis: every operation, schema-valid and
schema-violating bodies (a fixed, derandomized set of examples, ~15 s). No response may be a 5xx,
every status, content type, header and body must match the document, invalid bodies must be
rejected, and the server must still answer a normal request afterwards with nothing left running.

Excluded check: positive_data_acceptance. Some schema-valid requests are refused by design with a
documented 400 that depends on the loaded model and is not in the static schema: an empty prompt
without `suffix`, token ids beyond the vocabulary, `max_tokens` or a prompt beyond the context.
(schemathesis' pytest plugin does not run on pytest 9, so the operations are driven with hypothesis.)
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from starcoder2.server import create_app  # noqa: E402

EXAMPLES = 8  # per operation and mode
MAX_NEW = 4


def test_fuzz_the_openapi_schema(lm):
    app = create_app(lm, max_seq_len=64)
    state = app.state.server
    params = state.params  # at most MAX_NEW tokens per generation keep the run bounded
    state.params = lambda **kw: params(**{**kw, "max_new_tokens": min(kw["max_new_tokens"], MAX_NEW)})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, operations = {}, 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
                continue  # no parameters to break
            operations += 1

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):
                case.call_and_validate(excluded_checks=[positive_data_acceptance])

            try:
                run()
            except BaseException as e:  # schemathesis raises exception groups
                if isinstance(e, KeyboardInterrupt):
                    raise
                failures[f"{op.label} ({mode.value})"] = str(e)[:2000]
    assert operations >= 20
    assert not failures, "\n\n".join(f"== {k}\n{v}" for k, v in failures.items())
    assert state.in_flight == 0 and not state.live and not state.clients
    with TestClient(app) as client:  # the same app still serves a normal request
        r = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == lm.complete("def f(x):", max_new_tokens=3)

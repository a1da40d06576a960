"""The official clients against a live uvicorn server on 127.0.0.1: `openai` (completions with
`suffix`, streaming, stop, n, errors as the client's exceptions) and `text-generation` (generate,
generate_stream, details). Every text and token list is compared with what the model produces
directly (LoadedModel.generate / complete / infill on the same tiny checkpoint).

text-generation 0.7.0 pins huggingface-hub<1, which conflicts with transformers 5: scripts/setup.sh
installs it with --no-deps, and its tests skip when it is absent.
"""

import threading
import time

import pytest

from starcoder2.prompts import default_stop_ids
from starcoder2.server import create_app
from tests.server import live_server, slow_down

openai = pytest.importorskip("openai")

PROMPT = "for i in range(10):\n"  # the tiny random model answers " group group group ..."
PREFIX, SUFFIX = "for i in range(10):\n", "\nprint(i)\n"  # its infill: "defdefdef..."


@pytest.fixture(scope="module")
def port(lm):
    with live_server(create_app(lm, model_name="tiny", api_key="sekrit")) as p:
        yield p


@pytest.fixture(scope="module")
def oai(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sekrit", max_retries=0, timeout=30)


def engine_tokens(lm, ids: list[int], n: int) -> list[int]:
    """Greedy tokens straight from the model, cut at the server's stop ids."""
    out, stops = lm.generate(ids, max_new_tokens=n), set(default_stop_ids(lm.tokenizer))
    return out[:next((i for i, t in enumerate(out) if t in stops), len(out))]


# ---- openai -------------------------------------------------------------------------------------------

def test_openai_suffix_is_server_side_fim(oai, lm):
    r = oai.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0)
    assert r.model == "tiny" and r.object == "text_completion"
    assert r.choices[0].text == lm.infill(PREFIX, SUFFIX, max_new_tokens=8) != ""
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8


def test_openai_stream_equals_the_engine(oai, lm):
    chunks = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=9, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ids = lm.tokenizer.encode(PROMPT)
    assert text == lm.tokenizer.decode(engine_tokens(lm, ids, 9)) == lm.complete(PROMPT, max_new_tokens=9)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


def test_openai_stop_and_n(oai, lm):
    full = lm.complete(PROMPT, max_new_tokens=12)
    r = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=["p gr"], n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.text == full[:full.index("p gr")] == " grou" and c.finish_reason == "stop" for c in r.choices)
    # Seeded sampling: choice i uses seed + i, so a repeat of the request repeats every choice.
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2)
    first, again = oai.completions.create(**kw), oai.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]


def test_openai_errors_are_the_clients_exceptions(oai, port):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10**9)
    assert e.value.status_code == 400 and "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.completions.create(model="tiny", prompt=PROMPT, temperature=5)
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model="tiny", prompt=PROMPT)
    assert e.value.code == "invalid_api_key"
    assert [m.id for m in oai.models.list()] == ["tiny"]  # and the server still serves


def test_openai_superseded_request_is_a_conflict_error(lm):
    app = create_app(lm)
    slow_down(app, 0.02)  # 200 tokens would take 4 s
    with live_server(app) as p:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="-", max_retries=0, timeout=30,
                               default_headers={"X-Client-Id": "editor-1"})
        errors = []

        def old():
            try:
                client.completions.create(model="m", prompt=PROMPT, max_tokens=200, temperature=0)
            except openai.APIStatusError as e:
                errors.append(e)

        t = threading.Thread(target=old)
        t.start()
        deadline = time.monotonic() + 10
        while not app.state.server.engine.running:
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.01)
        new = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0)
        t.join(10)
        assert new.choices[0].text == lm.complete(PROMPT, max_new_tokens=4)
        (e,) = errors
        assert isinstance(e, openai.ConflictError) and e.code == "superseded"


# ---- text-generation ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tgi(port):
    text_generation = pytest.importorskip(
        "text_generation", reason="text-generation is not installed (scripts/setup.sh installs it with --no-deps)")
    return text_generation.Client(f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer sekrit"},
                                  timeout=30)


def test_text_generation_generate_with_details(tgi, lm):
    r = tgi.generate(PROMPT, max_new_tokens=7)
    ids = engine_tokens(lm, lm.tokenizer.encode(PROMPT), 7)
    assert r.generated_text == lm.tokenizer.decode(ids)
    assert [t.id for t in r.details.tokens] == ids
    assert r.details.finish_reason.value == "length" and r.details.generated_tokens == 7
    assert all(t.logprob <= 0 for t in r.details.tokens)


def test_text_generation_raw_fim_prompt_and_stop_sequence(tgi, lm):
    raw = f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    r = tgi.generate(raw, max_new_tokens=6)
    assert r.generated_text == lm.infill(PREFIX, SUFFIX, max_new_tokens=6)
    r = tgi.generate(PROMPT, max_new_tokens=12, stop_sequences=["p gr"])
    assert r.generated_text == " grou" and r.details.finish_reason.value == "stop_sequence"


def test_text_generation_stream(tgi, lm):
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=8))
    ids = engine_tokens(lm, lm.tokenizer.encode(PROMPT), 8)
    assert [e.token.id for e in events] == ids + [ids[-1]]  # the final event repeats the last token
    assert "".join(e.token.text for e in events) == events[-1].generated_text == lm.tokenizer.decode(ids)
    assert all(e.details is None for e in events[:-1])
    assert events[-1].details.finish_reason.value == "length" and events[-1].details.generated_tokens == 8


def test_text_generation_errors(tgi):
    import text_generation.errors as errors

    with pytest.raises(errors.ValidationError, match="max_new_tokens"):
        tgi.generate(PROMPT, max_new_tokens=10**9)

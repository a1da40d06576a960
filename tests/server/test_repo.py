"""`serve --repo`: /infill and Tabby requests get context retrieved from the served repository
(definitions of imported names, BM25 snippets) in StarCoder2's native format, next to what the
client sent, and the index follows edits to the repository."""

from __future__ import annotations

import time

import pytest

from starcoder2.cli import main
from starcoder2.server.core import ServerSettings
from tests.server import make_client, record_prompts

UTIL = "def planted_scale(x):\n    return x * 7919\n"
APP = "MARKER_ONLY_IN_APP = 1\n\n\ndef run(x):\n    return x\n"


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    (root / "util.py").write_text(UTIL)
    (root / "app.py").write_text(APP)
    return root


def _infill(client, prefix: str) -> str:
    r = client.post("/infill", json={"input_prefix": prefix, "input_suffix": "\n", "n_predict": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def test_infill_prompt_holds_the_planted_definition(lm, repo):
    with make_client(lm, repo=str(repo)) as client:
        seen = record_prompts(client)
        prefix = "from util import planted_scale\n\ny = planted_scale("
        prompt = _infill(client, prefix)
        assert prompt.startswith(f"<repo_name>{repo.name}<file_sep>util.py\n{UTIL}")
        assert prompt.endswith(f"<file_sep><fim_prefix>{prefix}<fim_suffix>\n<fim_middle>")  # no file name: no path line
        assert len(seen) == 1 and lm.tokenizer.decode(seen[0], skip_special=False) == prompt
        # A chunk the client sends joins the retrieved context.
        r = client.post("/infill", json={"input_prefix": prefix, "input_suffix": "", "n_predict": 1,
                                         "input_extra": [{"filename": "notes.py", "text": "NOTE = 5"}]})
        assert "<file_sep>notes.py\nNOTE = 5" in r.json()["prompt"] and "7919" in r.json()["prompt"]


def test_tabby_request_gets_retrieval_and_keeps_the_clients_declarations(lm, repo):
    with make_client(lm, repo=str(repo)) as client:
        segments = {"prefix": "from util import planted_scale\nMARKER_ONLY_IN_APP = planted_scale(", "suffix": ")\n",
                    "filepath": str(repo / "app.py"),
                    "declarations": [{"filepath": "lib.py", "body": "def declared(): ..."}]}
        r = client.post("/v1/completions", json={"segments": segments, "temperature": 0,
                                                 "debug_options": {"return_prompt": True}})
        assert r.status_code == 200, r.text
        prompt = r.json()["debug_data"]["prompt"]
        assert f"<file_sep>util.py\n{UTIL}" in prompt and "<file_sep>lib.py\ndef declared(): ..." in prompt
        assert "<fim_prefix>app.py\nfrom util import" in prompt  # the absolute path, made repository-relative
        assert prompt.count("MARKER_ONLY_IN_APP") == 1  # the current file is never retrieved: only its prefix


def test_an_edit_shows_up_after_the_refresh(lm, repo):
    with make_client(lm, repo=str(repo), repo_refresh_s=0.1) as client:
        prefix = "from util import planted_scale\n\ny = planted_scale("
        assert "7919" in _infill(client, prefix)
        (repo / "util.py").write_text(UTIL.replace("7919", "104729"))
        (repo / "fresh.py").write_text("def fresh_helper():\n    return 4242\n")
        deadline = time.monotonic() + 20
        while True:
            prompt = _infill(client, "from util import planted_scale\nfrom fresh import fresh_helper\n\ny = ")
            if "104729" in prompt and "return 4242" in prompt:
                break
            assert time.monotonic() < deadline, prompt
            time.sleep(0.1)
        assert "7919" not in prompt


def test_bad_repo_settings(tmp_path, capsys):
    with pytest.raises(ValueError, match="repo_refresh_s"):
        ServerSettings(repo=str(tmp_path), repo_refresh_s=0)
    assert main(["serve", "--repo", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]

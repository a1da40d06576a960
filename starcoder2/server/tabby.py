"""Tabby's completion API (what Tabby's IDE extensions send to a Tabby server) and `/v1/events`.

Tabby's request shares `POST /v1/completions` with OpenAI's; the body decides (schemas.py): a JSON
object with a `segments` key is Tabby's. The prompt is built here, in StarCoder2's own repository
format rather than Tabby's comment lines: declarations and snippets become context files (recently
opened first, then changed files, then declarations: the most relevant nearest the cursor), then
the current file as a FIM segment with its path; `git_url` names the repository. Without context or
a file path it is the plain PSM prompt. Segment texts are user text: special-token text in them
stays text. Long prompts are cut to fit (context files first, then prefix from the left, suffix from
the right). Stop: StarCoder2's control tokens and "\\n\\n" (Tabby's language-agnostic stop word).
With `serve --repo`, snippets retrieved from that repository and the definitions of the names the
file imports join the client's (repo_context.py). Not supported: `mode: "next_edit_suggestion"`.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from ..prompts import fim_prompt, repo_prompt
from ..tokenizer import TokenizerError
from .core import APIError, Generation, ServerState, seed_of
from .repo_context import client_snippet
from .schemas import TabbyCompletionRequest, TabbyEvent

MAX_DECODING_TOKENS = 64  # Tabby's default
DEFAULT_TEMPERATURE = 0.1  # Tabby's default sampling temperature
STOP = ["\n\n"]

router = APIRouter()


def _repo_name(git_url: str | None) -> str | None:
    if not git_url:
        return None
    name = git_url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return name.removesuffix(".git") or None


def build_prompt(state: ServerState, body: TabbyCompletionRequest) -> list[int]:
    tok, seg = state.tokenizer, body.segments
    if body.debug_options is not None and body.debug_options.raw_prompt is not None:
        return tok.encode(body.debug_options.raw_prompt, allow_special=True)
    snippets = [*(seg.relevant_snippets_from_recently_opened_files or []),
                *(seg.relevant_snippets_from_changed_files or []), *(seg.declarations or [])]
    files = [(s.filepath, s.body) for s in snippets]
    budget = state.context - MAX_DECODING_TOKENS
    suffix = seg.suffix or ""
    try:
        if files or seg.filepath:
            return repo_prompt(tok, files, seg.filepath, seg.prefix, suffix, repo_name=_repo_name(seg.git_url),
                               max_tokens=budget)
        return fim_prompt(tok, seg.prefix, suffix, max_tokens=budget)
    except (TokenizerError, ValueError) as e:
        raise APIError(400, str(e), param="segments") from None


async def retrieval_prompt(state: ServerState, body: TabbyCompletionRequest) -> list[int]:
    """`serve --repo`: the client's declarations and snippets, with retrieval from the served
    repository, through the repository assembler (native format)."""
    seg = body.segments
    sent = [*(seg.relevant_snippets_from_changed_files or []),
            *(seg.relevant_snippets_from_recently_opened_files or [])]
    try:
        assembled = await state.repo.aprompt(
            state.tokenizer, path=seg.filepath, prefix=seg.prefix, suffix=seg.suffix or "",
            budget=state.context - MAX_DECODING_TOKENS, snippets=[client_snippet(s.filepath, s.body) for s in sent],
            declarations=[client_snippet(s.filepath, s.body) for s in seg.declarations or []])
    except (TokenizerError, ValueError) as e:
        raise APIError(400, str(e), param="segments") from None
    return assembled.ids


async def complete(state: ServerState, body: TabbyCompletionRequest, http: HTTPRequest) -> dict:
    if body.mode not in (None, "standard"):
        raise APIError(400, f"mode {body.mode!r} is not supported (only \"standard\")", param="mode")
    raw = body.debug_options is not None and body.debug_options.raw_prompt is not None
    ids = await retrieval_prompt(state, body) if state.repo is not None and not raw else build_prompt(state, body)
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    gen = Generation(state, http)
    gen.reserve(1)
    gen.submit(ids, state.params(max_new_tokens=MAX_DECODING_TOKENS, temperature=temperature,
                                 seed=seed_of(body.seed), stop=STOP))
    await gen.drain(http)
    out: dict = {"id": f"cmpl-{uuid.uuid4()}", "choices": [{"index": 0, "text": gen.choices[0].text}],
                 "mode": body.mode or "standard"}
    debug = body.debug_options
    if debug is not None and (debug.return_prompt or debug.return_snippets):
        out["debug_data"] = {}
        if debug.return_prompt:
            out["debug_data"]["prompt"] = state.tokenizer.decode(ids, skip_special=False)
        if debug.return_snippets:
            seg = body.segments
            out["debug_data"]["snippets"] = [s.model_dump() for s in (seg.relevant_snippets_from_changed_files or [])
                                              + (seg.relevant_snippets_from_recently_opened_files or [])]
    return out


@router.post("/v1/events", response_class=Response, responses={200: {"description": "Recorded (empty body)"}})
async def events(body: TabbyEvent, request: HTTPRequest, select_kind: str | None = None) -> Response:
    """Tabby's acceptance telemetry: counted in /metrics by type, otherwise dropped."""
    state: ServerState = request.app.state.server
    kind = "select_line" if body.type == "select" and select_kind == "line" else body.type
    state.metrics.tabby_events[kind] += 1
    return Response(status_code=200)

"""The FastAPI app: one Engine on a background thread behind the editor APIs.

    from starcoder2 import load
    from starcoder2.server import create_app
    app = create_app(load("bigcode/starcoder2-3b"), api_key="secret", max_batch=8)
    # uvicorn.run(app, host="127.0.0.1", port=8000)     (or: starcoder2 serve)

Routes (request/response shapes: shared/reference/apis.md):
    OpenAI     POST /v1/completions (Tabby's body too, told apart by `segments`), GET /v1/models,
               POST /v1/chat/completions (models with a chat template; chat.py)
    TGI        POST /generate, /generate_stream, / (and /models/{id}), GET /info
    llama.cpp  POST /completion, /infill
    Tabby      POST /v1/completions, /v1/events
    utilities  POST /tokenize, /detokenize, GET /health, /metrics, / (the playground page)

Errors come in the family's shape, chosen by path: OpenAI `{"error": {message, type, param, code}}`
(also for /v1/events, /health, /metrics), TGI `{"error", "error_type"}` with 422 for invalid input,
llama.cpp `{"error": {code, message, type}}` (also for /tokenize, /detokenize). Invalid input is
always a 4xx in that shape, never FastAPI's default 422 `{"detail": ...}`.

API key: `Authorization: Bearer KEY` or `x-api-key: KEY`, compared with hmac.compare_digest, never
logged; GET /, /health, /openapi.json, /docs and CORS preflights need none.
Superseding: a request with an `X-Client-Id` header cancels the same client's older unfinished one,
which is answered 409 (core.py).
Deliberately left out: chat for base models (400; chat.py), `best_of` > n, logit_bias,
presence/frequency penalties (accepted, no effect), llama.cpp's slots API.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..api import LoadedModel
from ..model import StarCoder2
from ..tokenizer import StreamDecoder
from . import chat, llamacpp, openai, openapi_doc, tabby, tgi
from .core import APIError, ClientGone, ServerSettings, ServerState
from .schemas import DetokenizeRequest, TokenizeRequest

PLAYGROUND = Path(__file__).parent / "static" / "playground.html"
PLACEHOLDER_PAGE = ("<!doctype html><meta charset=utf-8><title>starcoder2</title>"
                    "<p>starcoder2 server. The playground page is not installed; the API is at "
                    "<code>/v1/completions</code> (see <a href=docs>/docs</a>).</p>")
PUBLIC_PATHS = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"}
TGI_ERROR_TYPES = {401: "authentication", 409: "superseded", 413: "validation", 422: "validation",
                   429: "overloaded"}
LLAMA_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "unavailable_error",
                     501: "not_supported_error", 503: "unavailable_error"}


def create_app(loaded_model: LoadedModel, draft_model: StarCoder2 | None = None, **settings) -> FastAPI:
    """The app for one loaded model (and an optional smaller draft model for speculation); keyword
    arguments are `ServerSettings` fields (core.py): model_name, api_key, max_batch, max_queue,
    max_seq_len, prefix_cache_tokens, num_draft, max_body_bytes, request_timeout_s, cors_origins,
    retry_after_s, repo, repo_refresh_s (`repo`: retrieve context from that repository for /infill
    and Tabby, repo_context.py)."""
    state = ServerState(loaded_model, ServerSettings(**settings), draft_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        try:
            yield
        finally:
            state.shutdown()

    app = FastAPI(title="starcoder2", version=__version__, lifespan=lifespan,
                  description="StarCoder2 code completion: OpenAI, TGI, llama.cpp and Tabby APIs.")
    app.state.server = state
    app.openapi = lambda: openapi_doc.document(app, family)  # the errors really sent
    for module in (openai, chat, tgi, llamacpp, tabby):
        app.include_router(module.router)
    app.include_router(_utility_routes())
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientGone, lambda request, exc: Response(status_code=499))
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(Gate, state=state)  # inside CORS, so preflights need no key
    if state.settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["*"])
    return app


# ---- errors ------------------------------------------------------------------------------------------

def family(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path in ("/", "/generate", "/generate_stream", "/info") or path.startswith("/models/"):
        return "tgi"
    if path in ("/completion", "/infill", "/tokenize", "/detokenize"):
        return "llamacpp"
    return "openai"


def error_response(path: str, status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = family(path)
    if kind == "tgi":
        status = 422 if status == 400 else status
        body: dict = {"error": message, "error_type": TGI_ERROR_TYPES.get(status, "generation")}
    elif kind == "llamacpp":
        body = {"error": {"code": status, "message": message,
                          "type": LLAMA_ERROR_TYPES.get(status, "invalid_request_error" if status < 500
                                                        else "server_error")}}
    else:
        body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                          "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
    return error_response(request.url.path, exc.status, exc.message, param=exc.param, code=exc.code,
                          headers=exc.headers)


async def _validation_error(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # Drop the union tags FastAPI puts in the location ("openai"/"tabby", "str", "list[int]", ...).
    loc = [p for p in loc if p not in ("openai", "tabby") and not p.startswith(("list[", "str", "int"))]
    if first.get("type") == "json_invalid":
        loc = []
        message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    elif first.get("type") == "missing" and not loc:
        message = "the body is missing"
    elif not loc and "json" not in request.headers.get("content-type", "json"):
        message = "send the body as JSON, with Content-Type: application/json"
    elif not loc:
        message = "the body must be a JSON object"
    else:
        message = f"{'.'.join(loc) + ': ' if loc else ''}{first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return error_response(request.url.path, 400, message, param=".".join(loc) or None)


async def _http_error(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, BodyTooLarge):
        return error_response(request.url.path, 413, str(exc.__cause__))
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return error_response(request.url.path, 400, "the body is not valid UTF-8")
    return error_response(request.url.path, exc.status_code, str(exc.detail), headers=exc.headers)


async def _internal_error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}")


# ---- the gate: API key, body size, request metrics ---------------------------------------------------

class BodyTooLarge(Exception):
    pass


class Gate:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state
        key = state.settings.api_key
        self.key = key.encode() if key else None

    def _authorized(self, headers: Headers) -> bool:
        given = headers.get("x-api-key", "")
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
        return hmac.compare_digest(given.encode(), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        path, method = scope["path"], scope["method"]
        headers = Headers(scope=scope)

        async def send_(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        limit, received = self.state.settings.max_body_bytes, [0]

        async def receive_() -> Message:
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > limit:
                raise BodyTooLarge(f"the body is larger than the server's limit of {limit} bytes")
            return message

        try:
            public = method == "OPTIONS" or path in PUBLIC_PATHS or (path == "/" and method in ("GET", "HEAD"))
            length = headers.get("content-length", "")
            if self.key is not None and not public and not self._authorized(headers):
                await error_response(path, 401, "invalid or missing API key", code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_)
            elif length.isdigit() and int(length) > limit:
                await error_response(path, 413, f"the body is larger than the server's limit of {limit} bytes"
                                     )(scope, receive, send_)
            else:
                await self.app(scope, receive_, send_)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.state.metrics.http(method, name, status[0], time.perf_counter() - t0)


# ---- utility routes ----------------------------------------------------------------------------------

def _utility_routes():
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def playground() -> Response:
        if PLAYGROUND.is_file():
            return FileResponse(PLAYGROUND, media_type="text/html")
        return HTMLResponse(PLACEHOLDER_PAGE)

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @router.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: HTTPRequest) -> PlainTextResponse:
        state: ServerState = request.app.state.server
        e = state.engine
        cached = e.prefix_cache.tokens if e.prefix_cache is not None else 0
        k = e.cache.k  # (L, B, n_kv_head, S, head_dim): K and V bytes per cached token, all layers
        text = state.metrics.render(queue_depth=len(e.waiting), running=len(e.running), in_flight=state.in_flight,
                                    prefix_cache_tokens=cached,
                                    prefix_cache_bytes=cached * 2 * k.shape[0] * k.shape[2] * k.shape[4] * k.element_size(),
                                    draft_tokens=e.stats["draft_tokens"], accepted_tokens=e.stats["accepted_tokens"])
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/v1/models")
    async def models(request: HTTPRequest) -> dict:
        state: ServerState = request.app.state.server
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "starcoder2"}]}

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: HTTPRequest):
        """llama.cpp: `{"content"}` -> `{"tokens": [ids]}` (`with_pieces`: `[{id, piece}]`).
        TGI: `{"inputs"}` -> `[{id, text, start, stop}]` (character offsets)."""
        state: ServerState = request.app.state.server
        tok = state.tokenizer
        text = body.content if body.content is not None else body.inputs
        if text is None:
            raise APIError(400, "give `content` (llama.cpp) or `inputs` (TGI)", param="content")
        ids = tok.encode(text, allow_special=body.parse_special)
        if body.content is None:  # TGI's shape; a character split across tokens counts at its last one
            out, start, stream = [], 0, StreamDecoder(tok, skip_special=False)
            for t in ids:
                stop = start + len(stream.push(t))
                out.append({"id": t, "text": tok.decode([t], skip_special=False), "start": start, "stop": stop})
                start = stop
            return out
        if body.with_pieces:
            return {"tokens": [{"id": t, "piece": tok.decode([t], skip_special=False)} for t in ids]}
        return {"tokens": ids}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: HTTPRequest) -> dict:
        state: ServerState = request.app.state.server
        vocab = state.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"content": state.tokenizer.decode(body.tokens, skip_special=False)}

    return router

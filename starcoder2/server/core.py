"""What every route shares: settings, the server state, errors, and the one asyncio/thread boundary.

The Engine decodes on its own thread and reports through callbacks. `Generation` is the bridge: each
engine callback hands its `Event` to the event loop with `loop.call_soon_threadsafe`, where the
bookkeeping (metrics, in-flight count, per-choice text) happens and the event is put on one
`asyncio.Queue` per HTTP request. Routes iterate `Generation.events()`. Every way of leaving early
(client disconnect, an exception, the deadline, a route's own stop rule, a newer request from the
same client) ends in `Engine.cancel`, which frees the engine row at once or at the end of the
running decode step.

Superseding (opt-in): a request carrying an `X-Client-Id` header cancels the unfinished request
that came earlier with the same id, on any endpoint. Editors send one per keystroke; only the
newest is worth computing. The older one ends with `Superseded` (409 in its API family's error
shape, or an in-band error event when it streams). The id is a header, not OpenAI's `user` field,
so that clients that send `user` for attribution never have requests cancelled without asking.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..api import LoadedModel
from ..infer.engine import Engine, Event, Request
from ..infer.generate import SamplingParams
from ..model import StarCoder2
from ..prompts import default_stop_ids
from .metrics import Metrics
from .repo_context import RepoContext

log = logging.getLogger("starcoder2.server")

CLIENT_ID_HEADER = "x-client-id"
MAX_CLIENT_ID = 256  # characters; a longer X-Client-Id is a 400
MIN_TEMPERATURE = 1e-4  # below this, sampling is greedy (logits / t would overflow for t -> 0)
CANCEL_GRACE_S = 10.0  # how long a timed-out generation may take to acknowledge its cancellation
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(kw_only=True)
class ServerSettings:
    """Server limits and options. Defaults suit one editor user on a workstation."""

    model_name: str | None = None  # name served in /v1/models and responses; default: the checkpoint dir's name
    api_key: str | None = None  # required as `Authorization: Bearer KEY` or `x-api-key: KEY` when set
    max_batch: int = 8  # engine rows: requests decoded together
    max_queue: int = 32  # engine requests allowed to wait beyond max_batch; more -> 429 with Retry-After
    max_seq_len: int | None = None  # tokens per row (prompt + completion); default: the model's context
    prefix_cache_tokens: int = 16384  # KV of earlier prompts kept for reuse; 0 turns the prefix cache off
    num_draft: int = 0  # speculation for greedy requests running alone (0: off): draft tokens per step
    max_body_bytes: int = 8 << 20  # larger bodies -> 413
    request_timeout_s: float = 300.0  # a generation still running then is stopped (finish "length")
    cors_origins: list[str] = field(default_factory=list)  # e.g. ["*"]; empty: no CORS headers
    retry_after_s: int = 1  # Retry-After of a 429
    repo: str | None = None  # a repository to retrieve context from (/infill, Tabby): repo_context.py
    repo_refresh_s: float = 2.0  # how often that repository's index is brought up to date

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.prefix_cache_tokens < 0 or self.num_draft < 0:
            raise ValueError("max_queue, prefix_cache_tokens and num_draft must be >= 0")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")
        if self.repo_refresh_s <= 0:
            raise ValueError(f"repo_refresh_s must be > 0, got {self.repo_refresh_s}")


class APIError(Exception):
    """An error answered in the calling API family's shape (see app.py). `status` is the OpenAI /
    llama.cpp status; TGI answers validation errors (400) with 422, as TGI does."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class Superseded(APIError):
    """A newer request with the same X-Client-Id replaced this one (answered 409)."""

    def __init__(self, client_id: str):
        super().__init__(409, f"superseded by a newer request with the same X-Client-Id ({client_id!r})",
                         code="superseded")


class EngineFailure(APIError):
    """An engine step raised while this request was running (answered 500)."""

    def __init__(self, message: str):
        super().__init__(500, f"generation failed: {message}")


class ServerState:
    """Everything the routes need, kept in `app.state.server` (no module-level state)."""

    def __init__(self, lm: LoadedModel, settings: ServerSettings, draft_model: StarCoder2 | None = None):
        """draft_model: drafts for speculation (with settings.num_draft > 0); else prompt lookup."""
        self.lm, self.tokenizer, self.settings = lm, lm.tokenizer, settings
        self.engine = Engine(lm.model, lm.tokenizer, max_batch=settings.max_batch, max_seq_len=settings.max_seq_len,
                             prefix_cache_tokens=settings.prefix_cache_tokens, num_draft=settings.num_draft,
                             draft_model=draft_model)
        self.failed: dict[Request, str] = {}  # requests running when a step raised -> the error
        self.engine.step = self._guard(self.engine.step)
        self.model_name = settings.model_name or lm.path.name
        self.stop_ids = default_stop_ids(lm.tokenizer)  # <|endoftext|>, <file_sep>, FIM and <repo_name>
        self.metrics = Metrics()
        self.created = int(time.time())
        self.in_flight = 0  # engine requests submitted and not finished
        self.live: set[Generation] = set()
        self.clients: dict[str, Generation] = {}  # X-Client-Id -> its newest unfinished Generation
        self.repo = RepoContext(settings.repo, settings.repo_refresh_s) if settings.repo else None

    @property
    def context(self) -> int:
        return self.engine.max_seq_len

    def room(self, n_prompt: int) -> int:
        """New tokens that fit after a prompt of n_prompt tokens."""
        return max(0, self.context - n_prompt)

    def _guard(self, step: Callable[[], None]) -> Callable[[], None]:
        """An engine step that, when it raises (out of memory, a kernel error), fails the requests
        it was running instead of killing the engine thread, so the server keeps serving."""

        def guarded_step() -> None:
            try:
                step()
            except Exception as e:
                log.exception("engine step failed; cancelling the running requests")
                for req in list(self.engine.running):
                    self.failed[req] = f"{type(e).__name__}: {e}"
                    self.engine.cancel(req)

        return guarded_step

    def params(self, **kw) -> SamplingParams:
        """SamplingParams with the server's stop ids; a bad value is a 400."""
        if 0 < kw.get("temperature", 0) < MIN_TEMPERATURE:
            kw["temperature"] = 0.0
        try:
            return SamplingParams(stop_token_ids=self.stop_ids, **kw)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def shutdown(self) -> None:
        """Cancel what is still running and stop the engine thread (and the repository refresh)."""
        for gen in list(self.live):
            gen.cancel()
        self.engine.stop()
        if self.repo is not None:
            self.repo.close()


@dataclass
class Choice:
    """One engine request of a Generation. `text` and `reason` are final once events() has ended."""

    index: int
    request: Request
    text: str = ""  # text returned by the engine so far
    tokens: int = 0  # token events delivered so far
    reason: str | None = None  # "eos" (a stop id), "stop" (a stop string), "length", "limit", "cancelled",
    # "superseded", "error", or a route's own cancel reason
    error: str | None = None  # with reason "error"
    cancel_reason: str | None = None  # why the server cancelled it (shown instead of "cancelled")


class Generation:
    """The engine requests of one HTTP request, seen from asyncio. Pass the HTTP request to take part
    in superseding (its X-Client-Id header, if any)."""

    def __init__(self, state: ServerState, http: HTTPRequest | None = None):
        self.state = state
        self.client_id = _client_id(http)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.choices: list[Choice] = []
        self.open = 0  # choices whose final event has not been delivered
        self.deadline = time.monotonic() + state.settings.request_timeout_s

    def reserve(self, n: int) -> None:
        """Supersede this client's older request, then 429 when n more engine requests would overflow
        the engine's rows plus the queue (the superseded request's rows count as free)."""
        s = self.state.settings
        capacity = s.max_batch + s.max_queue
        if n > capacity:
            raise APIError(400, f"this request needs {n} generations; the server runs at most {capacity} at once",
                           param="n")
        older = self.state.clients.get(self.client_id) if self.client_id else None
        freed = 0
        if older is not None and older is not self and older.open:
            freed = older.open  # their final events arrive on a later loop turn
            older.cancel(reason="superseded")
            self.state.metrics.superseded += 1
        if self.state.in_flight - freed + n > capacity:
            raise APIError(429, "the server is overloaded; retry later", code="rate_limit_exceeded",
                           headers={"Retry-After": str(s.retry_after_s)})

    def submit(self, prompt: list[int], params: SamplingParams, logprobs: int | None = None) -> Choice:
        """Queue one engine request; a prompt the engine refuses (empty, too long) is a 400 and
        cancels this Generation's earlier requests."""
        index = len(self.choices)

        def on_event(ev: Event) -> None:  # engine thread
            try:
                self.loop.call_soon_threadsafe(self._deliver, index, ev)
            except RuntimeError:  # the loop is closed (shutdown): nobody is waiting
                pass

        self.state.engine.start()  # no-op when running; covers apps used without their lifespan
        try:
            req = self.state.engine.submit(prompt, params, on_event, logprobs=logprobs)
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e), param="prompt") from None
        choice = Choice(index, req)
        self.choices.append(choice)
        self.open += 1
        self.state.in_flight += 1
        self.state.live.add(self)
        if self.client_id:
            self.state.clients[self.client_id] = self
        return choice

    def cancel(self, index: int | None = None, reason: str | None = None) -> None:
        """Cancel one choice or all unfinished ones; `reason` is reported instead of "cancelled"."""
        for c in self.choices if index is None else [self.choices[index]]:
            if c.reason is None and not c.request.finished:
                c.cancel_reason = c.cancel_reason or reason
                self.state.engine.cancel(c.request)

    def _deliver(self, index: int, ev: Event) -> None:
        """Event loop thread: book the event, then queue it for the route."""
        c, m = self.choices[index], self.state.metrics
        req = c.request
        c.text += ev.text
        if ev.token is not None:
            c.tokens += 1
            m.generated_tokens += 1
        if ev.finished:
            if req in self.state.failed:
                c.reason, c.error = "error", self.state.failed.pop(req)
            elif req.finish_reason == "cancelled":
                c.reason = c.cancel_reason or "cancelled"
            elif req.finish_reason == "stop":
                c.reason = "stop" if req.stopped_by_string else "eos"
            else:
                c.reason = req.finish_reason
            self.open -= 1
            self.state.in_flight -= 1
            if not self.open:
                self.state.live.discard(self)
                if self.client_id and self.state.clients.get(self.client_id) is self:
                    del self.state.clients[self.client_id]
            m.generations[c.reason] += 1
            m.prompt_tokens += len(req.prompt)
            m.cached_tokens += req.cached_tokens
            if req.t_first is not None and req.t_done is not None:
                m.ttft.observe(req.t_first - req.t_submit)
                m.generation_time.observe(req.t_done - req.t_submit)
                if len(req.output) > 1:
                    m.time_per_token.observe((req.t_done - req.t_first) / (len(req.output) - 1))
        self.queue.put_nowait((index, ev))

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, Event) until every choice has finished. Leaving early cancels the rest."""
        seen, expired = 0, False
        try:
            while seen < len(self.choices):
                remaining = self.deadline - time.monotonic()
                try:
                    index, ev = await asyncio.wait_for(self.queue.get(), max(remaining, 0.001))
                except asyncio.TimeoutError:  # (a builtin TimeoutError only from Python 3.11)
                    if expired:  # the engine did not answer the cancel (its thread died?): give up
                        for c in self.choices:
                            c.reason = c.reason or "limit"
                        return
                    self.cancel(reason="limit")  # final events follow within one decode step
                    expired, self.deadline = True, time.monotonic() + CANCEL_GRACE_S
                    continue
                if ev.finished:
                    seen += 1
                    if self.choices[index].reason == "error":
                        raise EngineFailure(self.choices[index].error or "")
                    if self.choices[index].reason == "superseded":
                        raise Superseded(self.client_id or "")
                yield index, ev
        finally:
            self.cancel()

    async def drain(self, http: HTTPRequest, on_event: Callable[[int, Event], None] | None = None) -> None:
        """Consume every event (non-streaming responses), cancelling when the client disconnects."""

        async def consume() -> None:
            async for index, ev in self.events():
                if on_event is not None:
                    on_event(index, ev)

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            gone = not work.done()
            if gone:
                work.cancel()  # the client left (or this handler was cancelled): free the engine rows
                self.cancel()
        if gone:
            await asyncio.wait({work})
            raise ClientGone
        work.result()  # re-raise a route error


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready; nobody reads the response."""


def _client_id(http: HTTPRequest | None) -> str | None:
    """The X-Client-Id header (None when absent or empty)."""
    value = http.headers.get(CLIENT_ID_HEADER, "").strip() if http is not None else ""
    if len(value) > MAX_CLIENT_ID:
        raise APIError(400, f"X-Client-Id is longer than {MAX_CLIENT_ID} characters", param=CLIENT_ID_HEADER)
    return value or None


async def _disconnected(http: HTTPRequest) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is that)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events whose generation is cancelled however the response ends: normally, by an
    exception, or when the client disconnects (Starlette then cancels the task writing the body)."""

    def __init__(self, content: AsyncIterator[str], generation: Generation, headers: dict[str, str] | None = None):
        super().__init__(content, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


def sse(obj: object) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def stream_error(e: Exception) -> str:
    """The message of an error raised after a stream's status line was sent (reported in-band)."""
    if not isinstance(e, APIError):
        log.exception("stream failed")
    return e.message if isinstance(e, APIError) else f"internal error: {type(e).__name__}"


def error_status(e: Exception) -> int:
    """The HTTP status an error raised after a stream's status line would have had."""
    return e.status if isinstance(e, APIError) else 500


def seed_of(seed: int | None, offset: int = 0) -> int | None:
    """A client seed as a torch seed (any int is accepted; choice i of n uses seed + i)."""
    return None if seed is None else (seed + offset) % (1 << 63)


def token_text(state: ServerState, token: int) -> str:
    return state.tokenizer.decode([token], skip_special=False)

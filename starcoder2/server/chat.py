"""OpenAI `POST /v1/chat/completions` for checkpoints that ship a chat template.

The conversation is rendered with the checkpoint's template (an adapter's own first, as
`finetune --sft` saves it) exactly as transformers renders it (../chat.py), encoded with its
control-token text as special tokens, and generated until the template's end-of-turn token (its eos,
or e.g. ChatML's `<|im_end|>`), a `stop` string or the token limit. A base checkpoint answers 400
with OpenAI's error shape: "<model> has no chat template: it is a base (completion) model; ...".

Request: messages (content a string or a list of text parts), max_completion_tokens / max_tokens
(default: up to the context), temperature (default 1), top_p, top_k (vLLM's extension), n, stop,
stream (+ stream_options.include_usage), seed (choice i uses seed + i), user.
Streaming sends `chat.completion.chunk` events: per choice first `delta: {"role": "assistant",
"content": ""}`, then `delta: {"content": ...}` pieces, then `delta: {}` with its finish_reason;
then the usage chunk when asked, then `data: [DONE]`.
Refused with 400: logprobs, tools, response_format other than text, logit_bias, non-text content parts.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request as HTTPRequest

from .. import __version__
from ..chat import ChatTemplate, ChatTemplateError, chat_prompt, chat_stop_ids, find_chat_template, no_chat_template
from .core import APIError, EventStream, Generation, ServerState, seed_of, sse
from .openai import FINISH, stream_error_event
from .schemas import MAX_N, MAX_STOP, StreamOptions, _Body

router = APIRouter()


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str  # "system" | "developer" | "user" | "assistant" | ...: the template decides what it accepts
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Body):
    model: str | None = None  # echoed back; any name is served by the one loaded model
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # the older name; max_completion_tokens wins
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1.0; 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None  # opaque, unused
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, no effect
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, no effect
    logprobs: bool | None = None  # only false
    top_logprobs: int | None = None  # only with logprobs
    logit_bias: dict[str, float] | None = None  # only empty or null
    tools: list[dict[str, Any]] | None = None  # only empty or null
    tool_choice: Any = None  # accepted: without tools there is nothing to choose
    response_format: dict[str, Any] | None = None  # only {"type": "text"}


@dataclasses.dataclass(frozen=True)
class ChatSetup:
    template: ChatTemplate
    stop_ids: list[int]  # the server's stop ids plus the template's end-of-turn ids


def chat_setup(http: HTTPRequest, state: ServerState) -> ChatSetup:
    """The served model's template, read once per app; a base model is a 400 on every request."""
    setup = getattr(http.app.state, "chat", None)
    if setup is None:
        template = find_chat_template(state.lm.adapter, state.lm.path)
        if template is None:
            raise APIError(400, str(no_chat_template(state.model_name)), param="messages",
                           code="chat_template_missing")
        stop_ids = sorted({*state.stop_ids, *chat_stop_ids(template, state.tokenizer)})
        setup = http.app.state.chat = ChatSetup(template, stop_ids)
    return setup


def _messages(body: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "\n".join(p.text for p in content)
        out.append({"role": m.role, "content": content, "name": m.name})  # None values are dropped
    return out


def _check_unsupported(body: ChatCompletionRequest) -> None:
    if body.logprobs:
        raise APIError(400, "logprobs is not supported for chat completions", param="logprobs")
    if body.tools:
        raise APIError(400, "tools are not supported", param="tools")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if body.response_format and body.response_format.get("type") != "text":
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
    state: ServerState = request.app.state.server
    _check_unsupported(body)
    setup = chat_setup(request, state)
    try:
        ids = chat_prompt(setup.template, state.tokenizer, _messages(body))
    except ChatTemplateError as e:  # the template refused the conversation (raise_exception)
        raise APIError(400, str(e), param="messages") from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > state.context:
        raise APIError(400, f"max_completion_tokens is {max_tokens}; the context holds {state.context} tokens",
                       param="max_completion_tokens")
    if max_tokens is None:
        max_tokens = state.room(len(ids))
        if max_tokens == 0:
            raise APIError(400, f"the conversation is {len(ids)} tokens; the context holds {state.context}",
                           param="messages")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
    gen = Generation(state, request)
    gen.reserve(body.n)
    for s in range(body.n):
        params = state.params(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else
                              body.temperature, top_p=body.top_p or 1.0, top_k=body.top_k or 0, stop=stop,
                              seed=seed_of(body.seed, s))
        gen.submit(ids, dataclasses.replace(params, stop_token_ids=setup.stop_ids))
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or state.model_name,
            "system_fingerprint": f"starcoder2-{__version__}"}
    if body.stream:
        return EventStream(_stream(body, gen, len(ids), base), gen)
    await gen.drain(request)
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                "finish_reason": FINISH.get(c.reason, "stop")} for c in gen.choices]
    return {**base, "object": "chat.completion", "choices": choices, "usage": _usage(gen, len(ids))}


def _usage(gen: Generation, prompt_tokens: int) -> dict:
    completion_tokens = sum(len(c.request.output) for c in gen.choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(body: ChatCompletionRequest, gen: Generation, prompt_tokens: int, base: dict
                  ) -> AsyncIterator[str]:
    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        return sse({**base, "object": "chat.completion.chunk",
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    for c in gen.choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    try:
        async for i, ev in gen.events():
            if ev.text:
                yield chunk(i, {"content": ev.text})
            if ev.finished:
                yield chunk(i, {}, FINISH.get(gen.choices[i].reason, "stop"))
    except Exception as e:  # the status line is gone: report in-band, then end the stream
        yield stream_error_event(e)
        return
    if body.stream_options is not None and body.stream_options.include_usage:
        yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(gen, prompt_tokens)})
    yield "data: [DONE]\n\n"

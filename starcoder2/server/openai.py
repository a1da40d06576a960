"""OpenAI `POST /v1/completions` (legacy completions), with `suffix` rendered as StarCoder2 FIM.

A string prompt without `suffix` is raw: special-token text in it (a client-side
`<fim_prefix>...<fim_middle>` template) becomes special tokens. With `suffix`, the server builds
`prompts.fim_prompt(prompt, suffix)` and both texts stay plain text. Token-id prompts are used as
given. Generation always stops on StarCoder2's control tokens; `stop` strings never reach the text.

`logprobs`: the log-probability of each generated token under the model (before temperature and
penalties), with the `logprobs` most likely alternatives; `tokens` lists every generated token, the
one that completed a stop string included. With `echo`, the prompt's tokens come first, the first
with logprob null, each other scored given the ones before it (one forward pass over the prompt,
beside the engine; `max_tokens: 0` scores a prompt without generating). Not with `suffix`.
Choices are indexed `prompt_index * n + sample_index`; sample i of a seeded request uses `seed + i`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import torch
from fastapi import APIRouter
from pydantic import ValidationError
from starlette.requests import Request as HTTPRequest

from .. import __version__
from ..prompts import fim_prompt
from ..tokenizer import TokenizerError
from . import tabby
from .core import APIError, EventStream, Generation, ServerState, error_status, seed_of, sse, stream_error, token_text
from .schemas import MAX_STOP, AnyCompletionRequest, CompletionRequest, GenerateParameters, TabbyCompletionRequest

DEFAULT_MAX_TOKENS = 16  # OpenAI's
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "limit": "length", "cancelled": "length"}


def stream_error_event(e: Exception) -> str:
    """An error after the 200 was sent, as the last event of an OpenAI stream (completions and chat)."""
    status = error_status(e)
    return sse({"error": {"message": stream_error(e), "param": None, "code": getattr(e, "code", None),
                          "type": "invalid_request_error" if status < 500 else "server_error"}})

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: AnyCompletionRequest, request: HTTPRequest):
    """OpenAI's completion request, or Tabby's: a body with a `segments` key is Tabby's."""
    state: ServerState = request.app.state.server
    if isinstance(body, TabbyCompletionRequest):
        return await tabby.complete(state, body, request)
    return await complete(state, body, request)


def _sampling(state: ServerState, body: CompletionRequest) -> dict:
    """Sampling options; llm-ls's TGI-shaped `parameters` fill in absent top-level fields."""
    try:
        alias = GenerateParameters.model_validate(body.parameters or {})
    except ValidationError as e:
        err = e.errors()[0]
        raise APIError(400, f"parameters.{'.'.join(map(str, err['loc']))}: {err['msg']}", param="parameters") from None
    max_tokens = body.max_tokens if body.max_tokens is not None else alias.max_new_tokens
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if max_tokens > state.context:
        raise APIError(400, f"max_tokens is {max_tokens}; the context holds {state.context} tokens",
                       param="max_tokens")
    stop = body.stop if body.stop is not None else alias.stop
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
    temperature = body.temperature if body.temperature is not None else alias.temperature
    top_p = body.top_p if body.top_p is not None else alias.top_p
    return dict(max_new_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p, top_k=body.top_k or 0,
                repetition_penalty=body.repetition_penalty or 1.0, stop=stop)


def _prompts(state: ServerState, body: CompletionRequest) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt."""
    tok, p = state.tokenizer, body.prompt
    items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not items:
        raise APIError(400, "the prompt is empty", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            try:
                raw = body.suffix is None
                ids = tok.encode(item, allow_special=True) if raw else fim_prompt(tok, item, body.suffix)
            except TokenizerError as e:
                raise APIError(400, str(e), param="suffix") from None
            text = item
        else:
            if body.suffix is not None:
                raise APIError(400, "suffix needs a text prompt, not token ids", param="suffix")
            vocab = state.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in item):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            ids, text = list(item), tok.decode(list(item), skip_special=False)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        out.append((text, ids))
    return out


async def complete(state: ServerState, body: CompletionRequest, http: HTTPRequest):
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of must equal n: server-side candidates are not supported", param="best_of")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if body.echo and body.logprobs is not None and body.suffix is not None:
        raise APIError(400, "echo with logprobs scores a plain prompt: not with suffix", param="suffix")
    sampling = _sampling(state, body)
    prompts = _prompts(state, body)
    echoed: list[dict | None] = [None] * len(prompts)  # the prompt part of each prompt's logprobs
    if body.echo and body.logprobs is not None:
        for k, (_, ids) in enumerate(prompts):
            lps, tops = await asyncio.to_thread(prompt_logprobs, state.lm.model, ids, body.logprobs)
            echoed[k] = _logprobs_object(state, ids, lps, tops, 0)
    gen = Generation(state, http)
    gen.reserve(len(prompts) * body.n)
    for _, ids in prompts:
        for s in range(body.n):
            gen.submit(ids, state.params(**sampling, seed=seed_of(body.seed, s)), logprobs=body.logprobs)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model or state.model_name}
    if body.stream:
        return EventStream(_stream(state, body, gen, prompts, base, echoed), gen)

    await gen.drain(http)
    choices = []
    for c in gen.choices:
        echo = prompts[c.index // body.n][0] if body.echo else ""
        lp = None if body.logprobs is None else _logprobs(state, c.request, 0, len(c.request.output), len(echo))
        if lp is not None and echoed[c.index // body.n] is not None:
            lp = {key: echoed[c.index // body.n][key] + lp[key] for key in lp}
        choices.append({"text": echo + c.text, "index": c.index, "logprobs": lp, "finish_reason": FINISH[c.reason]})
    return {**base, "system_fingerprint": f"starcoder2-{__version__}", "choices": choices,
            "usage": _usage(gen, prompts)}


def _usage(gen: Generation, prompts: list[tuple[str, list[int]]]) -> dict:
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    completion_tokens = sum(len(c.request.output) for c in gen.choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprobs(state: ServerState, req, start: int, stop: int, offset: int) -> dict:
    """OpenAI's logprobs object for generated tokens start..stop-1; text offsets begin at `offset`."""
    tops = req.top_logprobs[start:stop] if req.top_logprobs else [[] for _ in range(start, stop)]
    return _logprobs_object(state, req.output[start:stop], req.token_logprobs[start:stop], tops, offset)


def _logprobs_object(state: ServerState, ids: list[int], lps: list[float | None],
                     tops: list[list[tuple[int, float]] | None], offset: int) -> dict:
    """{tokens, token_logprobs, top_logprobs, text_offset}; a token without a logprob (the first of
    an echoed prompt) has null for both."""
    texts = [token_text(state, t) for t in ids]
    top_maps: list[dict | None] = []
    for t, lp, top in zip(ids, lps, tops):
        if lp is None:
            top_maps.append(None)
            continue
        m = {token_text(state, i): v for i, v in top}
        m.setdefault(token_text(state, t), lp)
        top_maps.append(m)
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": texts, "token_logprobs": list(lps), "top_logprobs": top_maps, "text_offset": offsets}


PROMPT_CHUNK = 256  # prompt positions per lm_head + log_softmax call: bounds the (chunk, V) fp32 buffer


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], k: int) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Log-probability of each prompt token given the tokens before it (None for the first) and
    the k most likely tokens at each position, from one causal forward pass without a KV cache
    (pure: safe beside the engine thread, which only reads the same weights)."""
    device = next(model.parameters()).device
    h = model.hidden_states(torch.tensor([ids], device=device))[0]  # (T, C)
    nxt = torch.tensor(ids[1:], device=device)  # (T-1,): position t predicts token t+1
    lps: list[float | None] = [None]
    tops: list[list[tuple[int, float]] | None] = [None]
    for s in range(0, len(ids) - 1, PROMPT_CHUNK):
        lp = model.logits(h[s:s + PROMPT_CHUNK][: len(ids) - 1 - s]).log_softmax(-1)  # (t, V) fp32
        lps += lp.gather(-1, nxt[s:s + PROMPT_CHUNK, None])[:, 0].tolist()
        if k:
            top = lp.topk(min(k, lp.shape[-1]), dim=-1)  # (t, k)
            tops += [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops += [[] for _ in range(lp.shape[0])]
    return lps, tops


async def _stream(state: ServerState, body: CompletionRequest, gen: Generation, prompts, base: dict,
                  echoed: list[dict | None]) -> AsyncIterator[str]:
    def chunk(index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse({**base, "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]})

    offsets = [0] * len(gen.choices)  # text offset of each choice's next token (logprobs)
    counts = [0] * len(gen.choices)  # token events seen per choice
    if body.echo:
        for c in gen.choices:
            offsets[c.index] = len(prompts[c.index // body.n][0])
            yield chunk(c.index, prompts[c.index // body.n][0], logprobs=echoed[c.index // body.n])
    try:
        async for i, ev in gen.events():
            if ev.finished:
                yield chunk(i, ev.text, finish=FINISH[gen.choices[i].reason])
                continue
            counts[i] += 1
            lp = None
            if body.logprobs is not None:
                lp = _logprobs(state, gen.choices[i].request, counts[i] - 1, counts[i], offsets[i])
                offsets[i] += len(lp["tokens"][0])
            if ev.text or lp is not None:
                yield chunk(i, ev.text, logprobs=lp)
    except Exception as e:  # the status line is gone: report in-band, then end the stream
        yield stream_error_event(e)
        return
    if body.stream_options is not None and body.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": _usage(gen, prompts)})
    yield "data: [DONE]\n\n"

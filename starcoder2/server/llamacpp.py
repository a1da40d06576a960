"""llama.cpp's native API (what llama.vim, llama.vscode, Continue's llama.cpp provider and Tabby's
`llama.cpp/completion` engine send): `POST /completion` and `POST /infill`.

`/completion`'s `prompt` is raw (special-token text becomes special tokens) or token ids. `/infill`
builds the prompt on the server: without `input_extra`, PSM `<fim_prefix>{input_prefix}{prompt}
<fim_suffix>{input_suffix}<fim_middle>`; with it, StarCoder2's repository format
`<file_sep>{filename}\\n{text}...<file_sep><fim_prefix>{input_prefix}{prompt}<fim_suffix>...`, chunks
first so the prefix cache keeps them between keystrokes (with `serve --repo`, retrieved snippets and the
definitions of imported names join them: repo_context.py). These fields are plain text. A prompt too
long for the context is cut (chunks first, then prefix from the left, suffix from the right) and
reported with `truncated: true`.

Options as llama.cpp: `n_predict` (-1: to the context, 0: prefill only, which warms the prefix
cache), `temperature` (<= 0: greedy), `top_k`, `top_p`, `repeat_penalty`, `seed` (-1: random),
`stop`, `stream`, `n_probs`, `n_indent` (stop at a later line indented less; the output keeps that
line's newline and indentation, as llama.cpp), `t_max_predict_ms` (stop once that much time has
passed since the first token and a newline has been generated), `samplers` (only which of top_k,
top_p, temperature and penalties are listed matters; a listed-out temperature means 1), and
`response_fields` (non-streaming answers keep only those, flattened with "/").
Accepted without effect: `cache_prompt` (the prefix cache is always on), `id_slot`, `min_p`,
`t_max_prompt_ms`, penalties other than `repeat_penalty`, the `infill` sampler.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request as HTTPRequest

from ..prompts import fim_prompt, repo_prompt
from ..tokenizer import TokenizerError
from .core import (
    APIError,
    Choice,
    EventStream,
    Generation,
    ServerState,
    error_status,
    seed_of,
    sse,
    stream_error,
    token_text,
)
from .repo_context import client_snippet
from .schemas import InfillRequest, LlamaCompletionRequest

STOP_TYPE = {"eos": "eos", "stop": "word", "length": "limit", "limit": "limit", "indent": "limit",
             "cancelled": "limit"}
SAMPLER_LETTERS = {"k": "top_k", "p": "top_p", "t": "temperature"}
RESERVE_UNLIMITED = 256  # tokens kept free for the answer when n_predict is -1 and the prompt is cut

router = APIRouter()


@router.post("/completion")
async def completion(body: LlamaCompletionRequest, request: HTTPRequest):
    state: ServerState = request.app.state.server
    if isinstance(body.prompt, str):
        ids = state.tokenizer.encode(body.prompt, allow_special=True)
    else:
        vocab = state.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.prompt):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        ids = list(body.prompt)
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return await _run(state, request, body, ids, truncated=False)


@router.post("/infill")
async def infill(body: InfillRequest, request: HTTPRequest):
    state: ServerState = request.app.state.server
    if not isinstance(body.prompt, str):
        raise APIError(400, "/infill takes `prompt` as text (it is appended to input_prefix)", param="prompt")
    tok, prefix = state.tokenizer, body.input_prefix + body.prompt
    files = [(c.filename, c.text) for c in body.input_extra]
    reserve = body.n_predict if body.n_predict >= 0 else min(RESERVE_UNLIMITED, state.context // 4)
    budget = state.context - max(1, reserve)
    if state.repo is not None:  # `serve --repo`: retrieved context joins the client's chunks
        try:
            assembled = await state.repo.aprompt(tok, path=None, prefix=prefix, suffix=body.input_suffix,
                                                 budget=budget, snippets=[client_snippet(*f) for f in files])
        except TokenizerError as e:
            raise APIError(501, f"infill is not supported by this model: {e}") from None
        except ValueError as e:
            raise APIError(400, str(e), param="n_predict") from None
        return await _run(state, request, body, assembled.ids, assembled.truncated)

    def render(max_tokens: int | None) -> list[int]:
        if files:
            return repo_prompt(tok, files, None, prefix, body.input_suffix, max_tokens=max_tokens)
        return fim_prompt(tok, prefix, body.input_suffix, max_tokens=max_tokens)

    try:
        ids = render(None)
        truncated = len(ids) > budget
        if truncated:
            ids = render(budget)
    except TokenizerError as e:
        raise APIError(501, f"infill is not supported by this model: {e}") from None
    except ValueError as e:
        raise APIError(400, str(e), param="n_predict") from None
    return await _run(state, request, body, ids, truncated)


def _sampling(state: ServerState, body: LlamaCompletionRequest, n_prompt: int) -> dict:
    s = body.samplers
    listed = None if s is None else ({SAMPLER_LETTERS.get(ch, ch) for ch in s} if isinstance(s, str) else set(s))

    def on(name: str) -> bool:
        return listed is None or name in listed or (name == "temperature" and "temp" in listed)

    greedy = body.temperature <= 0
    temperature = 0.0 if greedy else (body.temperature if on("temperature") else 1.0)
    room = state.room(n_prompt)
    return dict(max_new_tokens=room if body.n_predict < 0 else min(body.n_predict, room),
                temperature=temperature, top_k=body.top_k if on("top_k") and body.top_k > 0 else 0,
                top_p=body.top_p if on("top_p") and 0 < body.top_p < 1 else 1.0,
                repetition_penalty=body.repeat_penalty if on("penalties") else 1.0,
                seed=None if body.seed < 0 or body.seed == 0xFFFFFFFF else seed_of(body.seed), stop=body.stop)


class IndentCut:
    """llama.cpp's `n_indent`: after the first line, a line whose first non-blank character sits
    at a column below n_indent ends the completion (cut after that line's indentation). Text is
    released only once its line's indentation is known."""

    def __init__(self, n_indent: int):
        self.n, self.text, self.sent, self.ok = n_indent, "", 0, 0
        self.line: int | None = None  # start of the current line after the first; None: still in the first
        self.cut = False

    def push(self, piece: str, final: bool = False) -> str:
        if self.cut:
            return ""
        self.text += piece
        t = self.text
        while True:
            if self.line is None:
                nl = t.find("\n", self.ok)
                if nl < 0:
                    self.ok = len(t)
                    break
                self.line = self.ok = nl + 1
                continue
            body = t[self.line:]
            indent = len(body) - len(body.lstrip(" \t"))
            rest = body[indent:]
            if rest in ("", "\r"):  # only indentation so far: undecided
                if final:
                    self.ok = len(t)
                break
            if rest.startswith(("\n", "\r\n")):  # a blank line does not count
                self.line = self.ok = self.line + indent + rest.index("\n") + 1
                continue
            if indent < self.n:
                self.ok, self.cut = self.line + indent, True
                break
            nl = t.find("\n", self.line)
            if nl < 0:
                self.ok = len(t)
                break
            self.line = self.ok = nl + 1
        out, self.sent = t[self.sent:self.ok], self.ok
        return out


class Shaper:
    """Per request: the returned text after `n_indent` and `t_max_predict_ms`; asks to stop."""

    def __init__(self, body: LlamaCompletionRequest, gen: Generation):
        self.gen, self.body = gen, body
        self.indent = IndentCut(body.n_indent) if body.n_indent > 0 else None
        self.content = ""

    def push(self, c: Choice, text: str, final: bool) -> str:
        if self.indent is not None:
            text = self.indent.push(text, final)
            if self.indent.cut and not final:
                self.gen.cancel(c.index, reason="indent")
        self.content += text
        t_max, req = self.body.t_max_predict_ms, c.request
        if (not final and t_max > 0 and req.t_first is not None and "\n" in self.content
                and (time.perf_counter() - req.t_first) * 1000 > t_max):
            self.gen.cancel(c.index, reason="limit")
        return text


async def _run(state: ServerState, http: HTTPRequest, body: LlamaCompletionRequest, ids: list[int], truncated: bool):
    gen = Generation(state, http)
    gen.reserve(1)
    gen.submit(ids, state.params(**_sampling(state, body, len(ids))), logprobs=body.n_probs or None)
    shaper = Shaper(body, gen)
    if body.stream:
        return EventStream(_stream(state, body, gen, shaper, ids, truncated), gen)
    await gen.drain(http, lambda i, ev: shaper.push(gen.choices[i], ev.text, ev.finished))
    out = _result(state, body, gen.choices[0], shaper.content, ids, truncated)
    if body.n_probs:
        out["completion_probabilities"] = [_probs(state, gen.choices[0].request, k)
                                           for k in range(len(gen.choices[0].request.output))]
    if body.response_fields:
        out = {f: v for f in body.response_fields if (v := _nested(out, f)) is not _MISSING}
    return out


_MISSING = object()


def _nested(obj: dict, path: str):
    for part in path.split("/"):
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def _probs(state: ServerState, req, k: int) -> dict:
    t = req.output[k]
    return {"id": t, "token": token_text(state, t), "logprob": req.token_logprobs[k],
            "top_logprobs": [{"id": i, "token": token_text(state, i), "logprob": lp} for i, lp in req.top_logprobs[k]]}


def _result(state: ServerState, body: LlamaCompletionRequest, c: Choice, content: str, ids: list[int],
            truncated: bool) -> dict:
    req = c.request
    n = len(req.output)
    first = req.t_first or req.t_done or req.t_submit
    prompt_ms = (first - req.t_submit) * 1000
    predicted_ms = ((req.t_done or first) - first) * 1000
    prompt_n = len(ids) - req.cached_tokens
    stopping_word = ""
    if c.reason == "stop":
        rest = state.tokenizer.decode(req.output)[len(c.text):]
        stopping_word = next((s for s in body.stop if s and rest.startswith(s)), "")
    return {
        "index": 0, "content": content, "tokens": [], "id_slot": 0, "stop": True, "model": state.model_name,
        "tokens_predicted": n, "tokens_evaluated": len(ids),
        "generation_settings": {"n_predict": body.n_predict, "temperature": body.temperature, "top_k": body.top_k,
                                "top_p": body.top_p, "repeat_penalty": body.repeat_penalty, "seed": body.seed,
                                "stop": body.stop, "n_probs": body.n_probs, "n_indent": body.n_indent,
                                "t_max_predict_ms": body.t_max_predict_ms, "samplers": body.samplers},
        "prompt": state.tokenizer.decode(ids, skip_special=False), "has_new_line": "\n" in content,
        "truncated": truncated, "stop_type": STOP_TYPE[c.reason], "stopping_word": stopping_word,
        "tokens_cached": req.cached_tokens,
        "timings": {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
                    "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
                    "prompt_per_second": prompt_n / (prompt_ms / 1000) if prompt_ms > 0 else 0.0,
                    "predicted_n": n, "predicted_ms": predicted_ms,
                    "predicted_per_token_ms": predicted_ms / max(n, 1),
                    "predicted_per_second": n / (predicted_ms / 1000) if predicted_ms > 0 else 0.0},
    }


async def _stream(state: ServerState, body: LlamaCompletionRequest, gen: Generation, shaper: Shaper,
                  ids: list[int], truncated: bool) -> AsyncIterator[str]:
    k = 0
    try:
        async for i, ev in gen.events():
            c = gen.choices[i]
            text = shaper.push(c, ev.text, ev.finished)
            if ev.finished:
                out = _result(state, body, c, text, ids, truncated)
                yield sse(out)
                continue
            k += 1
            if not text and not body.n_probs:
                continue
            event = {"index": 0, "content": text, "tokens": [ev.token], "stop": False, "id_slot": 0,
                     "tokens_predicted": k, "tokens_evaluated": len(ids)}
            if body.n_probs:
                event["completion_probabilities"] = [_probs(state, c.request, k - 1)]
            yield sse(event)
    except Exception as e:  # the status line is gone: report in-band
        status = error_status(e)
        yield sse({"error": {"code": status, "message": stream_error(e),
                             "type": "invalid_request_error" if status < 500 else "server_error"},
                   "content": "", "stop": True})

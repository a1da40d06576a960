"""TGI's API (what llm-ls / llm-vscode and the `text-generation` client send): `POST /generate`,
`POST /generate_stream`, `POST /` and `POST /models/{id}` (HF Inference-API shape), `GET /info`.

`inputs` is a raw prompt: TGI applies no template, clients write `<fim_prefix>...` as text and it
becomes special tokens. Sampling is on when `do_sample` is set or implied, as in TGI, by a
temperature other than 1, `top_k` or `top_p` < 1; otherwise decoding is greedy. Validation errors
are 422 `{"error", "error_type": "validation"}`.

Streams: one event per generated token (`token.text` is the text that token releases: never part of
a stop string, and empty while a character or a possible stop string is incomplete), then a final
event carrying `generated_text` and `details`, whose token is the EOS token (`special: true`,
logprob 0.0: not recorded) after a stop token, else the last token again with any held-back text.
No `[DONE]`.
Not supported: `best_of` > 1, `watermark`, `grammar` (422); prefill logprobs (null).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse

from .. import __version__
from .core import APIError, EventStream, Generation, ServerState, seed_of, sse, stream_error, token_text
from .schemas import MAX_STOP, GenerateParameters, GenerateRequest

FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length", "limit": "length", "cancelled": "length"}

router = APIRouter()


@router.post("/generate")
async def generate(body: GenerateRequest, request: HTTPRequest):
    return await _run(request, body, stream=False, as_list=False)


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: HTTPRequest):
    return await _run(request, body, stream=True, as_list=False)


@router.post("/")
async def inference_api(body: GenerateRequest, request: HTTPRequest):
    """`{"inputs", "parameters", "stream"}`: a list `[{"generated_text"}]`, or the SSE stream."""
    return await _run(request, body, stream=body.stream, as_list=True)


@router.post("/models/{model_id:path}")
async def inference_api_model(model_id: str, body: GenerateRequest, request: HTTPRequest):
    """llm-ls's `huggingface` backend: as `POST /`; any model id is served by the loaded model."""
    return await _run(request, body, stream=body.stream, as_list=True)


@router.get("/info")
async def info(request: HTTPRequest) -> dict:
    state: ServerState = request.app.state.server
    s, param = state.settings, next(state.lm.model.parameters())
    return {"model_id": state.model_name, "model_sha": None, "model_dtype": str(param.dtype).removeprefix("torch."),
            "model_device_type": param.device.type, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": s.max_batch + s.max_queue, "max_best_of": 1, "max_stop_sequences": MAX_STOP,
            "max_input_tokens": state.context - 1, "max_input_length": state.context - 1,
            "max_total_tokens": state.context, "waiting_served_ratio": 0.0,
            "max_batch_total_tokens": s.max_batch * state.context, "max_waiting_tokens": 0,
            "max_batch_size": s.max_batch, "validation_workers": 1, "max_client_batch_size": 1,
            "router": "starcoder2", "version": __version__, "sha": None, "docker_label": None}


def _submit(state: ServerState, http: HTTPRequest, body: GenerateRequest, stream: bool
            ) -> tuple[Generation, list[int]]:
    p = body.parameters
    if p.best_of not in (None, 1):
        raise APIError(400, "best_of > 1 is not supported", param="best_of")
    if p.watermark:
        raise APIError(400, "watermark is not supported", param="watermark")
    if p.grammar is not None:
        raise APIError(400, "grammar is not supported", param="grammar")
    ids = state.tokenizer.encode(body.inputs, allow_special=True)
    if p.truncate is not None:
        ids = ids[-p.truncate:]
    if not ids:
        raise APIError(400, "`inputs` cannot be empty", param="inputs")
    max_new = state.room(len(ids)) if p.max_new_tokens is None else p.max_new_tokens
    if max_new > state.context:
        raise APIError(400, f"max_new_tokens is {max_new}; the context holds {state.context} tokens",
                       param="max_new_tokens")
    sampling = (p.do_sample or p.top_k is not None or (p.temperature is not None and p.temperature != 1.0)
                or (p.top_p is not None and p.top_p < 1.0))
    params = state.params(max_new_tokens=max_new, temperature=(p.temperature or 1.0) if sampling else 0.0,
                          top_k=(p.top_k or 0) if sampling else 0, top_p=(p.top_p or 1.0) if sampling else 1.0,
                          repetition_penalty=p.repetition_penalty or 1.0, seed=seed_of(p.seed), stop=p.stop)
    want = stream or p.details or p.top_n_tokens
    gen = Generation(state, http)
    gen.reserve(1)
    gen.submit(ids, params, logprobs=(p.top_n_tokens or 0) if want else None)
    return gen, ids


async def _run(http: HTTPRequest, body: GenerateRequest, stream: bool, as_list: bool):
    state: ServerState = http.app.state.server
    gen, ids = _submit(state, http, body, stream)
    if stream:
        return EventStream(_stream(state, body, gen, ids), gen)
    await gen.drain(http)
    c, p = gen.choices[0], body.parameters
    out: dict = {"generated_text": (body.inputs if p.return_full_text else "") + c.text}
    if p.details:
        out["details"] = _details(state, c, ids, p)
    return JSONResponse([out] if as_list else out, headers=_timing_headers(state, c.request))


def _token(state: ServerState, t: int, logprob: float | None) -> dict:
    return {"id": t, "text": token_text(state, t), "logprob": logprob, "special": t in state.tokenizer.special_ids}


def _top_tokens(state: ServerState, req, k: int) -> list[dict]:
    return [_token(state, t, lp) for t, lp in req.top_logprobs[k]] if req.top_logprobs else []


def _details(state: ServerState, c, ids: list[int], p: GenerateParameters) -> dict:
    req = c.request
    return {"finish_reason": FINISH[c.reason], "generated_tokens": len(req.output), "seed": p.seed,
            "prefill": [_token(state, t, None) for t in ids] if p.decoder_input_details else [],
            "tokens": [_token(state, t, lp) for t, lp in zip(req.output, req.token_logprobs)],
            "top_tokens": [_top_tokens(state, req, k) for k in range(len(req.output))] if p.top_n_tokens else []}


def _timing_headers(state: ServerState, req) -> dict[str, str]:
    total = (req.t_done or req.t_submit) - req.t_submit
    decode = (req.t_done - req.t_first) if req.t_first and req.t_done else 0.0
    n = len(req.output)
    return {"x-compute-type": next(state.lm.model.parameters()).device.type, "x-compute-time": f"{total:.6f}",
            "x-total-time": str(round(total * 1000)), "x-validation-time": "0",
            "x-queue-time": str(round(((req.t_first or req.t_submit) - req.t_submit) * 1000)),
            "x-inference-time": str(round(total * 1000)),
            "x-time-per-token": str(round(decode * 1000 / max(n - 1, 1))),
            "x-prompt-tokens": str(len(req.prompt)), "x-generated-tokens": str(n)}


async def _stream(state: ServerState, body: GenerateRequest, gen: Generation, ids: list[int]) -> AsyncIterator[str]:
    p = body.parameters
    index, last, last_logprob = 0, None, 0.0
    try:
        async for _, ev in gen.events():
            c = gen.choices[0]
            req = c.request
            if not ev.finished:
                token = {"id": ev.token, "text": ev.text, "logprob": req.token_logprobs[index], "special": False}
                top = _top_tokens(state, req, index) if p.top_n_tokens else None
                yield sse({"index": index, "token": token, "top_tokens": top, "generated_text": None, "details": None})
                index, last, last_logprob = index + 1, ev.token, token["logprob"]
                continue
            # The stop token's logprob is not recorded by the engine: 0.0 (text-generation needs a float).
            eos = c.reason == "eos" or last is None
            token = {"id": state.tokenizer.eos_id if eos else last, "text": ev.text,
                     "logprob": 0.0 if eos else last_logprob, "special": eos and not ev.text}
            details = {"finish_reason": FINISH[c.reason], "generated_tokens": len(req.output),
                       "input_length": len(ids), "seed": p.seed}
            generated = (body.inputs if p.return_full_text else "") + c.text
            yield sse({"index": index, "token": token, "top_tokens": None, "generated_text": generated,
                       "details": details})
    except Exception as e:  # the status line is gone: report in-band
        yield sse({"error": stream_error(e), "error_type": "generation"})

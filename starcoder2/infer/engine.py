"""The inference engine: many requests at once over one model and one preallocated KV cache.

Continuous batching: between two decode steps, finished and cancelled requests leave and waiting
ones join (their prompt is prefilled into a free cache row, reusing a cached prefix when one
matches). Running requests always occupy cache rows 0..A-1, so a decode step works on views of the
cache, never on copies; when a request leaves, the last row moves into its place.

Each request has its own sampling parameters, RNG, stop ids and stop strings, and an optional
callback that receives an `Event` per token (text pieces that are whole UTF-8 characters, never a
stop string or a special token) and a final one. `cancel()` frees the slot at once, or at the end
of the current step when called from inside one (a callback, another thread).

Threading: `step()` is synchronous. `start()` runs steps on a background thread whenever there is
work; `submit()` and `cancel()` may be called from any thread. The server puts its asyncio
boundary on top of the callbacks.

Decode steps and verify passes run all blocks in one native call where that applies (fused.py),
else the model's modules. Greedy output of a request is the same alone or in a batch, and equals
`generate.generate` (tests).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..device import make_generator
from ..kv_cache import KVCache
from ..model import StarCoder2
from ..tokenizer import Tokenizer
from .fused import FusedDecoder, decode_hidden_states
from .generate import SamplingParams, prefill
from .prefix_cache import PrefixCache
from .sampling import apply_repetition_penalty, sample
from .speculative import prompt_lookup_draft
from .text import TextStream


@dataclass
class Event:
    request: Request
    token: int | None  # None on the final event
    text: str  # new text (empty without a tokenizer)
    finished: bool = False


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] | None = None
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None  # time of the first token
    t_done: float | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    # Log-probabilities of the model's distribution (before penalties and temperature), recorded per
    # output token when `logprobs` is not None: the sampled token's, and the `logprobs` most likely.
    logprobs: int | None = None
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # decoding state
    _pos: int = 0  # position of the next token to feed
    _pending: int | None = None  # sampled token not yet fed
    _stream: TextStream | None = None
    _gen: torch.Generator | None = None
    _seen: torch.Tensor | None = None  # (V,) bool, for the repetition penalty

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stopped_by_string(self) -> bool:
        """True when a stop string (not a stop id) ended the request."""
        return self._stream is not None and self._stream.stopped

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


class Engine:
    def __init__(self, model: StarCoder2, tokenizer: Tokenizer | None = None, max_batch: int = 8,
                 max_seq_len: int | None = None, prefix_cache_tokens: int = 0, num_draft: int = 0,
                 draft_model: StarCoder2 | None = None):
        """num_draft > 0 turns on speculation (up to that many draft tokens per step) for a greedy
        request running alone: drafts come from `draft_model` (a smaller model with the same
        vocabulary), else from prompt lookup. The output is the same as without speculation."""
        cfg = model.config
        param = next(model.parameters())
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, param.device
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.cache = KVCache(cfg, max_batch, self.max_seq_len, dtype=param.dtype, device=param.device)
        self.prefix_cache = PrefixCache(prefix_cache_tokens, cfg.sliding_window) if prefix_cache_tokens else None
        self.fused = FusedDecoder.build(model)  # None: decode runs the modules
        self.num_draft = num_draft
        self.draft = _DraftModel(draft_model, cfg.vocab_size, self.max_seq_len) if draft_model is not None else None
        self.running: list[Request] = []  # running[i] lives in cache row i
        self.waiting: deque[Request] = deque()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards `waiting` and the cancelled flags
        self._work = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one step at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "cached_tokens": 0,
                      "draft_tokens": 0, "accepted_tokens": 0}

    # ---- public --------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None, logprobs: int | None = None) -> Request:
        params = params or SamplingParams()
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_seq_len}")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        req = Request(next(self._ids), list(prompt), params, on_event, logprobs=logprobs)
        with self._work:
            self.waiting.append(req)
            self._work.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request; its slot is free when this returns, unless a step is running right now."""
        with self._lock:
            req.cancelled = True
        if self._step_lock.acquire(blocking=False):
            try:
                self._reap()
            finally:
                self._step_lock.release()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> None:
        """Admit waiting requests into free rows (prefill), then one decode step for all running."""
        with self._step_lock:
            self._reap()
            while len(self.running) < self.max_batch:
                with self._lock:
                    if not self.waiting:
                        break
                    req = self.waiting.popleft()
                self._prefill(req)
            if self.running:
                self._decode()
            self._reap()

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[Request]:
        """Synchronous convenience: run prompts to completion (on the calling thread)."""
        reqs = [self.submit(p, params) for p in prompts]
        if self._thread is not None:
            for r in reqs:
                r.wait()
        else:
            while not all(r.finished for r in reqs):
                self.step()
        return reqs

    def start(self) -> None:
        """Run steps on a background thread while there is work."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="starcoder2-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._work:
                self._stopping = True
                self._work.notify()
            self._thread.join()
            self._thread = None

    # ---- internals -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._stopping and not self.has_work():
                    self._work.wait()
                if self._stopping:
                    return
            self.step()

    def _emit(self, req: Request, token: int | None, text: str, finished: bool = False) -> None:
        req.text += text
        if req.on_event is not None:
            req.on_event(Event(req, token, text, finished))

    @torch.inference_mode()
    def _prefill(self, req: Request) -> None:
        row = len(self.running)
        self.running.append(req)
        self.cache.reset([row])
        reused = 0
        if self.prefix_cache is not None:
            reused, entry = self.prefix_cache.lookup(req.prompt)
            if entry is not None:
                self.cache.write_row(row, *entry.slice(self.prefix_cache.needed_from(reused), reused))
        req.cached_tokens = reused
        logits = prefill(self.model, req.prompt, self.cache, row, start=reused)  # (V,)
        if self.prefix_cache is not None:
            self.prefix_cache.store(req.prompt, *self.cache.read_row(row))
        p = req.params
        req._pos = len(req.prompt)
        req._gen = make_generator(p.seed, self.device)
        req._stream = TextStream(self.tokenizer, p.stop) if self.tokenizer is not None else None
        if p.repetition_penalty != 1.0:
            req._seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            req._seen[torch.tensor(req.prompt, device=self.device)] = True
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(req.prompt)
        self.stats["cached_tokens"] += reused
        if p.max_new_tokens == 0:
            self._finish(req, "length")
        else:
            self._accept(req, logits[None])  # (1, V)

    @torch.inference_mode()
    def _decode(self) -> None:
        live = [r for r in self.running if r._pending is not None and not r.finished]
        if len(live) != len(self.running):  # finished rows still in place: reap first
            self._reap()
            live = list(self.running)
            if not live:
                return
        A = len(live)
        if A == 1 and self.num_draft and self._speculative_step(live[0]):
            return
        ids = torch.tensor([[r._pending] for r in live], device=self.device)  # (A, 1)
        pos = torch.tensor([[r._pos] for r in live], device=self.device)  # (A, 1)
        h = decode_hidden_states(self.model, self.fused, ids, pos, self.cache, slice(0, A))
        logits = self.model.logits(h[:, -1])  # (A, V)
        for i, r in enumerate(live):
            r._pos += 1
            self._accept(r, logits[i:i + 1])

    def _speculative_step(self, req: Request) -> bool:
        """Verify draft tokens in one forward pass; False when there is nothing to try."""
        p = req.params
        if p.temperature > 0 or req._seen is not None:
            return False
        budget = min(self.num_draft, p.max_new_tokens - len(req.output) - 1,
                     self.max_seq_len - req._pos - 2, self.cache.capacity - 1)
        if budget <= 0:
            return False
        # prompt + output: the request's tokens at positions 0.._pos, the last one (_pending) not yet fed
        draft = (self.draft.propose(req, budget) if self.draft is not None
                 else prompt_lookup_draft(req.prompt + req.output, max_draft=budget))
        if not draft:
            return False
        tokens = [req._pending] + draft  # positions req._pos .. req._pos + len(draft)
        ids = torch.tensor([tokens], device=self.device)  # (1, 1 + n_draft)
        pos = torch.arange(req._pos, req._pos + len(tokens), device=self.device)[None]
        self.cache.speculate()
        try:
            h = decode_hidden_states(self.model, self.fused, ids, pos, self.cache, slice(0, 1))
            logits = self.model.logits(h)[0]  # (T, V)
        except BaseException:
            self.cache.accept(0)  # leave the cache as it was
            raise
        preds = logits.argmax(-1).tolist()
        n_ok = next((i for i, d in enumerate(draft) if preds[i] != d), len(draft))
        self.cache.accept(1 + n_ok)  # the fed token and the accepted drafts; rejected ones vanish
        if self.draft is not None:
            self.draft.keep(req._pos + 1 + n_ok)
        self.stats["draft_tokens"] += len(draft)
        self.stats["accepted_tokens"] += n_ok
        for i in range(n_ok + 1):  # accepted drafts plus the model's own next token
            req._pos += 1
            self._accept(req, logits[i:i + 1])
            if req._pending is None:
                break
        return True

    def _accept(self, req: Request, logits: torch.Tensor) -> None:
        """Sample the next token of `req` from logits (1, V) and act on it."""
        p = req.params
        req._pending = None
        if req.cancelled:
            return self._finish(req, "cancelled")
        raw = logits
        if req._seen is not None:
            logits = apply_repetition_penalty(logits, req._seen[None], p.repetition_penalty)
        tok = int(sample(logits, p.temperature, p.top_k, p.top_p, req._gen)[0])
        if req.t_first is None:
            req.t_first = time.perf_counter()
        if tok in p.stop_token_ids:
            return self._finish(req, "stop")
        req.output.append(tok)
        if req.logprobs is not None:
            lp = raw[0].float().log_softmax(-1)  # (V,)
            req.token_logprobs.append(float(lp[tok]))
            if req.logprobs:
                top = lp.topk(min(req.logprobs, lp.shape[0]))
                req.top_logprobs.append(list(zip(top.indices.tolist(), top.values.tolist())))
        self.stats["generated_tokens"] += 1
        if req._seen is not None:
            req._seen[tok] = True
        text = req._stream.push(tok) if req._stream is not None else ""
        self._emit(req, tok, text)
        if req._stream is not None and req._stream.stopped:
            return self._finish(req, "stop")
        if len(req.output) >= p.max_new_tokens or req._pos + 1 >= self.max_seq_len:
            return self._finish(req, "length")
        req._pending = tok

    def _finish(self, req: Request, reason: str) -> None:
        if req.finished:
            return
        req.finish_reason = reason
        req._pending = None
        tail = req._stream.flush() if req._stream is not None and reason != "cancelled" else ""
        req.t_done = time.perf_counter()
        self._emit(req, None, tail, finished=True)
        req.done.set()

    def _reap(self) -> None:
        """Drop finished and cancelled requests; keep the running ones in rows 0..A-1."""
        with self._lock:
            dropped = [r for r in self.waiting if r.cancelled]
            for req in dropped:
                self.waiting.remove(req)
        for req in dropped:  # callbacks run outside the lock: they may call submit() or cancel()
            self._finish(req, "cancelled")
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if req.cancelled and not req.finished:
                self._finish(req, "cancelled")
            if req.finished:
                last = len(self.running) - 1
                if i != last:
                    self.cache.move_row(last, i)
                    self.running[i] = self.running[last]
                self.running.pop()
                self.cache.reset([last])
            else:
                i += 1


class _DraftModel:
    """A small model that guesses the next tokens of the request running alone, greedily, with a
    one-row KV cache of its own that follows that request (caught up by a prefill when the request
    changed or ran in a batch meanwhile, cut back to the accepted tokens after each verification).
    Its guesses only decide how many tokens a step yields: the target model checks every one."""

    def __init__(self, model: StarCoder2, vocab_size: int, max_seq_len: int):
        if model.config.vocab_size != vocab_size:
            raise ValueError(f"the draft model has {model.config.vocab_size} embeddings, the model {vocab_size}: "
                             "speculation needs one vocabulary (e.g. a smaller StarCoder2 for a larger one)")
        param = next(model.parameters())
        self.model = model.eval()
        self.fused = FusedDecoder.build(self.model)
        self.cache = KVCache(model.config, 1, min(max_seq_len, model.config.max_position_embeddings),
                             dtype=param.dtype, device=param.device)
        self.request: int | None = None  # the id of the request whose tokens the cache holds
        self.length = 0  # the cache holds that request's positions 0..length-1

    @torch.inference_mode()
    def propose(self, req: Request, n: int) -> list[int]:
        """Up to n greedy guesses for the tokens after position req._pos."""
        tokens = req.prompt + req.output  # positions 0..req._pos
        if self.request != req.id:
            self.cache.reset()
            self.request, self.length = req.id, 0
        n = min(n, self.cache.capacity - 1 - req._pos) if not self.cache.ring else n
        if n <= 0:
            return []
        logits = prefill(self.model, tokens, self.cache, 0, start=self.length)  # (V,) after position _pos
        draft = [int(logits.argmax())]
        pos = req._pos + 1
        while len(draft) < n:
            ids = torch.tensor([[draft[-1]]], device=self.cache.k.device)  # (1, 1)
            h = decode_hidden_states(self.model, self.fused, ids, torch.tensor([[pos]], device=ids.device),
                                     self.cache, slice(0, 1))
            draft.append(int(self.model.logits(h[0, -1]).argmax()))
            pos += 1
        self.length = pos  # fed: tokens up to _pos and the first n-1 guesses
        return draft

    def keep(self, length: int) -> None:
        """The target accepted the request's tokens up to position length-1: forget later guesses."""
        self.length = min(self.length, length)
        self.cache.truncate(0, self.length)

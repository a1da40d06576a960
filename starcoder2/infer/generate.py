"""The reference generation loop: prefill, then incremental decode with an explicit KV cache.

Short and plain on purpose: it is the oracle the inference engine is tested against. Prompts of
different lengths are batched without padding: each prompt is prefilled into its own cache row (a
compute-bound step, so little is lost), then all live rows decode together, each at its own
position. A row leaves the batch when it emits a stop id, reaches `max_new_tokens`, hits the
context length, or is cancelled by the caller (`cancelled`, e.g. when a stop string completed).

    for row, token in generate_tokens(model, [ids_a, ids_b], SamplingParams(max_new_tokens=64)):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..device import make_generator
from ..kv_cache import KVCache
from ..model import StarCoder2
from .fused import FusedDecoder, decode_hidden_states
from .sampling import apply_repetition_penalty, sample

PREFILL_CHUNK = 2048  # prompt tokens per forward pass: bounds the (T, n_keys) attention mask


@dataclass(kw_only=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None  # each row gets its own generator seeded with this: same output alone or batched
    stop: list[str] = field(default_factory=list)  # stop strings (text level, see infer/text.py)
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@torch.inference_mode()
def prefill(model: StarCoder2, ids: list[int], cache: KVCache, row: int, start: int = 0,
            chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run prompt tokens ids[start:] into cache row `row`, whose positions 0..start-1 the caller has
    filled (a reused prefix) or which is empty; returns the logits of the last position, (V,) fp32."""
    device = cache.k.device
    rows = slice(row, row + 1)  # a view of the cache row, no copies
    for begin in range(start, len(ids), chunk):
        piece = torch.tensor([ids[begin:begin + chunk]], device=device)  # (1, T)
        pos = torch.arange(begin, begin + piece.shape[1], device=device)[None]  # (1, T)
        h = model.hidden_states(piece, pos, cache, rows)
    return model.logits(h[0, -1])


@torch.inference_mode()
def generate_tokens(model: StarCoder2, prompts: list[list[int]], params: SamplingParams,
                    cancelled: set[int] | None = None) -> Iterator[tuple[int, int]]:
    """Yields (row, token) in decode order. Stop ids end a row and are not yielded. Rows in
    `cancelled` (which the caller may fill while iterating) end before their next token."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.config
    max_len = cfg.max_position_embeddings
    if max(len(p) for p in prompts) >= max_len:
        raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room in the "
                         f"{max_len}-token context")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    B = len(prompts)
    seq_len = min(max_len, max(len(p) for p in prompts) + params.max_new_tokens)
    cache = KVCache(cfg, B, seq_len, dtype=dtype, device=device)
    fused = FusedDecoder.build(model)
    cancelled = cancelled if cancelled is not None else set()
    stop_ids = set(params.stop_token_ids)
    gens = [make_generator(params.seed, device) for _ in range(B)]
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, torch.tensor(p, device=device)] = True

    logits = torch.stack([prefill(model, p, cache, b) for b, p in enumerate(prompts)])  # (B, V)
    pos = [len(p) for p in prompts]  # position of each row's next token
    active = list(range(B))
    for step in range(params.max_new_tokens):
        rows = torch.tensor(active, device=device)
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen[rows], params.repetition_penalty)
        nxt = [int(sample(logits[i:i + 1], params.temperature, params.top_k, params.top_p, gens[b])[0])
               for i, b in enumerate(active)]
        still = []
        for b, tok in zip(active, nxt):
            if tok in stop_ids or b in cancelled:
                continue
            yield b, tok
            if b in cancelled or pos[b] + 1 >= max_len:
                continue
            if seen is not None:
                seen[b, tok] = True
            still.append((b, tok))
        if not still or step == params.max_new_tokens - 1:
            return
        active = [b for b, _ in still]
        rows = torch.tensor(active, device=device)
        ids = torch.tensor([[t] for _, t in still], device=device)  # (B_active, 1)
        input_pos = torch.tensor([[pos[b]] for b in active], device=device)  # (B_active, 1)
        for b in active:
            pos[b] += 1
        # All rows in order need no row index (the cache's cheap path); otherwise name the rows.
        cache_rows = None if active == list(range(B)) else rows
        h = decode_hidden_states(model, fused, ids, input_pos, cache, cache_rows)
        logits = model.logits(h[:, -1])  # (B_active, V)


def generate(model: StarCoder2, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """All new tokens of every prompt (stop ids excluded)."""
    out: list[list[int]] = [[] for _ in prompts]
    for b, tok in generate_tokens(model, prompts, params):
        out[b].append(tok)
    return out

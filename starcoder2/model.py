"""The StarCoder2 decoder as a plain nn.Module (reference: ../shared/reference/starcoder2.md §2).

    h = E[ids]                                   embedding (+ dropout when training)
    for each block:
        h = h + Attn(LN1(h))                     GQA, half-split RoPE, sliding window, biases
        h = h + MLP(LN2(h))                      c_fc -> GELU(tanh) -> c_proj, biases
    logits = LN_f(h) @ E_out^T                   E_out = E when tied

Module names follow the Hugging Face checkpoint (`self_attn.q_proj`, `mlp.c_fc`, `input_layernorm`,
...) so the checkpoint table in checkpoint.py is nearly the identity. The module holds no loading,
sampling or parallelism code; those act on it from outside.

Shapes: B batch, T new tokens, C hidden size, nh query heads, nkv KV heads, hd head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import CachePlan, KVCache


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """pos: (B, T) -> cos, sin: (B, 1, T, hd). Computed in fp32 as transformers does, then cast."""
    # int64 arange -> fp32 -> / hd -> theta ** (.) in fp32: the exact op order of transformers.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=pos.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)  # (hd/2,)
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd): half-split (NeoX) layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, n, T, hd). rotate_half(x) = cat(-x2, x1), not interleaved pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        C, hd = config.hidden_size, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q_proj = nn.Linear(C, self.n_head * hd, bias=config.use_bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * hd, bias=config.use_bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * hd, bias=config.use_bias)
        self.o_proj = nn.Linear(self.n_head * hd, C, bias=config.use_bias)
        self.attention_dropout = config.attention_dropout
        self.residual_dropout = config.residual_dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: KVCache | None = None, plan: CachePlan | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None and plan.steps is not None:
            # Speculative verify: token by token, as one-token decode computes it (same keys, same
            # kernel), so the verified logits equal plain decoding's (see kv_cache.py).
            ys = []
            for t in range(T):
                kt, vt = kv_cache.update_step(layer, plan, t, k[:, :, t:t + 1], v[:, :, t:t + 1])
                ys.append(self._attend(q[:, :, t:t + 1], kt, vt, plan.steps[t].mask))
            return F.dropout(self.o_proj(torch.cat(ys, dim=1)), self.residual_dropout, self.training)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, plan, k, v)  # (B, nkv, n_keys, hd)
            mask = plan.mask
        return F.dropout(self.o_proj(self._attend(q, k, v, mask)), self.residual_dropout, self.training)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, nh, T, hd), k/v (B, nkv, n_keys, hd), mask (B, 1, T, n_keys) or None (causal) -> (B, T, nh*hd)."""
        B, _, T, _ = q.shape
        rep = self.n_head // self.n_kv_head
        if T == 1 and rep > 1 and mask is not None:
            # Decode: fold each KV head's query group into the query axis, (B, nkv, rep, hd). Same
            # maths as enable_gqa, but SDPA's CPU kernel runs ~10x faster in bf16 this way.
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_head, rep, self.head_dim), k, v,
                                               attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
            return y.reshape(B, T, self.n_head * self.head_dim)  # (B, nkv, rep, hd) -> (B, 1, nh*hd)
        # SDPA: softmax in fp32 internally; GQA without materialising repeated K/V. mask None -> causal.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim), enable_gqa=self.n_kv_head != self.n_head)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.use_bias)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.use_bias)
        self.residual_dropout = config.residual_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C)
        return F.dropout(self.c_proj(h), self.residual_dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None, plan=None, layer=0):  # x: (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, plan, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T) positions that restart at 0 where the id changes.

    1 1 1 2 2 0 0 -> 0 1 2 0 1 0 1: each packed example sees the positions it would see alone."""
    T = segment_ids.shape[1]
    idx = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)  # (B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # first token of each run
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values  # index minus its run's first index


class StarCoder2(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the head with the embedding when the config says so (call again after load/to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Training from scratch: Linear and Embedding weights ~ N(0, initializer_range), biases 0,
        LayerNorm weight 1 and bias 0 (transformers' `_init_weights`, reference §2.5)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        self.tie_weights()

    def _mask(self, pos: torch.Tensor, default_pos: bool) -> torch.Tensor | None:
        """Mask for attention without a cache; None means plain causal (SDPA's fast path)."""
        T, W = pos.shape[1], self.config.sliding_window
        if default_pos and (W is None or T <= W):
            return None
        q, k = pos[:, None, :, None], pos[:, None, None, :]  # (B, 1, T, 1), (B, 1, 1, T)
        mask = k <= q
        return mask & (k > q - W) if W is not None else mask

    def hidden_states(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None, cache_rows: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> final normalised hidden states (B, T, C).

        input_pos: (B, T) or (T,) absolute positions (default 0..T-1). With `kv_cache`, the new
        tokens are appended to the cache rows `cache_rows` (default: rows 0..B-1).
        segment_ids: (B, T) ints for rows that pack several examples (training, no cache); each
        example is a contiguous run of one id. A token attends only to earlier tokens of its own
        run (block-diagonal causal mask, window included), and positions restart at 0 per run
        unless `input_pos` is given, so every example computes what it would alone."""
        B, T = input_ids.shape
        if segment_ids is not None and kv_cache is not None:
            raise ValueError("segment_ids are for training on packed rows, not with a KV cache")
        default_pos = input_pos is None and segment_ids is None
        if input_pos is None:
            input_pos = torch.arange(T, device=input_ids.device) if segment_ids is None else segment_positions(segment_ids)
        if input_pos.dim() == 1:
            input_pos = input_pos[None].expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        x = F.dropout(x, self.config.embedding_dropout, self.training)
        cos, sin = rope_cos_sin(input_pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        plan, mask = None, None
        if kv_cache is not None:
            plan = kv_cache.plan(input_pos, cache_rows)
        else:
            mask = self._mask(input_pos, default_pos)
            if segment_ids is not None:  # (B, 1, T, T): same run only; runs are contiguous, so the
                # position-based causal and window tests of _mask hold inside each run
                mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, kv_cache, plan, i)
        if kv_cache is not None:
            kv_cache.commit(plan, input_pos)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) -> fp32 logits (..., V)."""
        return self.lm_head(h).float()

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, cache_rows: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) LongTensor -> logits (B, T, V) in fp32 (segment_ids: see hidden_states)."""
        return self.logits(self.hidden_states(input_ids, input_pos, kv_cache, cache_rows, segment_ids))

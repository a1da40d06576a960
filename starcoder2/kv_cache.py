"""An explicit, preallocated KV cache: per layer, B rows of S slots; a ring buffer under a sliding window.

Positional contract: every token written has an absolute position (its RoPE position, 0-based, per
row). A token at position p lives in slot `p % S`. `slot_pos[b, s]` records which position a slot
holds (-1: empty), so the attention mask is computed from positions, never from slot order.

With a sliding window W, query position i sees keys j with i - W < j <= i, so S = W slots are enough
for decode at any length (reference §2.4). Two write modes keep that exact:
- one new token per row (decode): write first, then attend over the cache. The write overwrites only
  position p - S, which is already outside the window.
- several new tokens (prefill, chunked prefill): attend over [cached keys, new keys] first, then write
  the last min(T, S) new tokens. Writing first could overwrite keys the chunk's first queries need.
Without a window (or when max_seq_len < W) S = max_seq_len, and a position >= S raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


@dataclass
class CachePlan:
    """What one forward pass does with the cache; built once, used by every layer."""

    rows: torch.Tensor | None  # (B,) cache rows of the batch, or None for all rows in order
    slots: torch.Tensor  # (B, T_write) slots written
    write_from: int  # new tokens [write_from:] are written (T - T_write)
    n_cached: int  # cached slots [0:n_cached] take part in attention
    append_new: bool  # True: attend over [cache, new]; False: write first, attend over cache
    mask: torch.Tensor  # (B, 1, T, n_keys) bool, True = attend


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        W = config.sliding_window
        self.window = W
        self.ring = W is not None and max_seq_len > W
        self.capacity = W if self.ring else max_seq_len  # S
        shape = (config.num_layers, batch_size, config.num_kv_heads, self.capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, n_kv_head, S, head_dim)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((batch_size, self.capacity), -1, dtype=torch.long, device=device)  # (B, S)
        self.n_used = 0  # slots [0:n_used) may hold data in some row (host-side, avoids a device sync)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self, rows: list[int] | torch.Tensor | None = None) -> None:
        """Forget the content of some rows (all by default); their slots become empty at once."""
        if rows is None:
            self.slot_pos.fill_(-1)
            self.n_used = 0
        else:
            self.slot_pos[rows] = -1

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def plan(self, input_pos: torch.Tensor, rows: torch.Tensor | None = None) -> CachePlan:
        """input_pos: (B, T) absolute positions of the new tokens, consecutive within a row."""
        B, T = input_pos.shape
        S = self.capacity
        max_pos = int(input_pos.max())
        if not self.ring and max_pos >= S:
            raise ValueError(f"position {max_pos} exceeds the KV cache capacity of {S} tokens")
        append_new = T > 1
        write_from = max(0, T - S) if append_new else 0
        slots = input_pos[:, write_from:] % S  # (B, T_write)
        n_cached = self.n_used if append_new else min(S, max(self.n_used, max_pos + 1))

        slot_pos = self.slot_pos if rows is None else self.slot_pos[rows]  # (B, S)
        if append_new:
            key_pos = torch.cat([slot_pos[:, :n_cached], input_pos], dim=1)  # (B, n_cached + T)
        else:
            key_pos = slot_pos[:, :n_cached].clone()
            key_pos.scatter_(1, slots, input_pos)  # the new token is written before attention
        q = input_pos[:, :, None]  # (B, T, 1)
        k = key_pos[:, None, :]  # (B, 1, n_keys)
        mask = (k >= 0) & (k <= q)
        if self.window is not None:
            mask &= k > q - self.window
        return CachePlan(rows, slots, write_from, n_cached, append_new, mask[:, None])

    def commit(self, plan: CachePlan, input_pos: torch.Tensor) -> None:
        """Record the positions written by the forward pass that used `plan`."""
        pos = input_pos[:, plan.write_from:]
        if plan.rows is None:
            self.slot_pos.scatter_(1, plan.slots, pos)
        else:
            self.slot_pos[plan.rows[:, None], plan.slots] = pos
        self.n_used = min(self.capacity, max(self.n_used, int(plan.slots.max()) + 1))

    def update(self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, n_kv_head, T, head_dim) for the new tokens. Writes them; returns the keys and
        values attention should use, (B, n_kv_head, n_keys, head_dim), in the order of `plan.mask`."""
        kc, vc = self.k[layer], self.v[layer]  # (B_all, n_kv_head, S, head_dim)
        rows = plan.rows
        if plan.append_new:
            old_k = kc[:, :, :plan.n_cached] if rows is None else kc[rows, :, :plan.n_cached]
            old_v = vc[:, :, :plan.n_cached] if rows is None else vc[rows, :, :plan.n_cached]
            k_all, v_all = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        r = torch.arange(k.shape[0], device=k.device) if rows is None else rows
        w = plan.write_from
        # Advanced indices (rows, slots) around a slice put their dims first: value is (B, T, n_kv, hd).
        kc[r[:, None], :, plan.slots] = k[:, :, w:].transpose(1, 2)
        vc[r[:, None], :, plan.slots] = v[:, :, w:].transpose(1, 2)
        if plan.append_new:
            return k_all, v_all
        if rows is None:
            return kc[:, :, :plan.n_cached], vc[:, :, :plan.n_cached]
        return kc[rows, :, :plan.n_cached], vc[rows, :, :plan.n_cached]

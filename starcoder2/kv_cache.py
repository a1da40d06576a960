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

Speculative verification (`speculate`, then one forward pass over T tokens, then `accept(n)`) runs
its attention as T decode steps, each over exactly the keys, slots and mask that one-token decode
would use at that position, writing as it goes and saving what it overwrites; `accept(n)` restores
the slots of the rejected tokens. With row-exact matrix products (the native CPU kernels) the verify
pass then gives the logits of plain decoding bit for bit, so speculation never changes an output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

Rows = torch.Tensor | slice | None


def row_index(rows: Rows, batch: int, device: torch.device) -> torch.Tensor:
    if rows is None:
        return torch.arange(batch, device=device)
    if isinstance(rows, slice):
        return torch.arange(rows.start or 0, rows.stop, device=device)
    return rows


@dataclass
class DecodeStep:
    """Token t of a speculative pass, attended as one-token decode at its position would be."""

    slots: torch.Tensor  # (B, 1) slot written
    n_cached: int  # cached slots [0:n_cached] take part in attention
    mask: torch.Tensor  # (B, 1, 1, n_cached) bool


@dataclass
class CachePlan:
    """What one forward pass does with the cache; built once, used by every layer."""

    rows: Rows  # cache rows of the batch: None (all, in order), a slice (views, no copy) or a (B,) tensor
    slots: torch.Tensor  # (B, T_write) slots written
    write_from: int  # new tokens [write_from:] are written (T - T_write)
    n_cached: int  # cached slots [0:n_cached] take part in attention
    append_new: bool  # True: attend over [cache, new]; False: write first, attend over cache
    mask: torch.Tensor  # (B, 1, T, n_keys) bool, True = attend
    steps: list[DecodeStep] | None = None  # speculative: one decode step per new token
    undo: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # speculative: per layer, overwritten k, v
    input_pos: torch.Tensor | None = None  # speculative: positions of the new tokens


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
        self._speculating: list[CachePlan] | None = None

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

    def truncate(self, row: int, length: int) -> None:
        """Forget a row's positions >= length (a draft model's rejected guesses). Exact unless a ring
        buffer already overwrote positions that are still inside the window of later queries."""
        pos = self.slot_pos[row]
        pos[pos >= length] = -1

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def plan(self, input_pos: torch.Tensor, rows: Rows = None) -> CachePlan:
        """input_pos: (B, T) absolute positions of the new tokens, consecutive within a row."""
        B, T = input_pos.shape
        S = self.capacity
        max_pos = int(input_pos.max())
        if not self.ring and max_pos >= S:
            raise ValueError(f"position {max_pos} exceeds the KV cache capacity of {S} tokens")
        slot_pos = self.slot_pos if rows is None else self.slot_pos[rows]  # (B, S); a view for a slice
        if self._speculating is not None:
            return self._speculative_plan(input_pos, rows, slot_pos)
        append_new = T > 1
        write_from = max(0, T - S) if append_new else 0
        slots = input_pos[:, write_from:] % S  # (B, T_write)
        n_cached = self.n_used if append_new else min(S, max(self.n_used, max_pos + 1))
        if append_new:
            key_pos = torch.cat([slot_pos[:, :n_cached], input_pos], dim=1)  # (B, n_cached + T)
        else:
            key_pos = slot_pos[:, :n_cached].clone()
            key_pos.scatter_(1, slots, input_pos)  # the new token is written before attention
        return CachePlan(rows, slots, write_from, n_cached, append_new, self._mask(input_pos, key_pos))

    def _mask(self, input_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """(B, T) query and (B, n_keys) key positions (-1: empty) -> (B, 1, T, n_keys), True = attend."""
        q = input_pos[:, :, None]  # (B, T, 1)
        k = key_pos[:, None, :]  # (B, 1, n_keys)
        mask = (k >= 0) & (k <= q)
        if self.window is not None:
            mask &= k > q - self.window
        return mask[:, None]

    def _speculative_plan(self, input_pos: torch.Tensor, rows: Rows, slot_pos: torch.Tensor) -> CachePlan:
        """The T decode steps of a verify pass: slots, key counts and masks as `plan` gives one-token
        decode after the earlier tokens were committed (followed on a copy of slot_pos and n_used)."""
        B, T = input_pos.shape
        if T > self.capacity:
            raise ValueError("a speculative step cannot be longer than the cache")
        slot_pos, n_used, steps = slot_pos.clone(), self.n_used, []
        for t in range(T):
            pos = input_pos[:, t:t + 1]  # (B, 1)
            slots = pos % self.capacity
            n_cached = min(self.capacity, max(n_used, int(pos.max()) + 1))
            slot_pos.scatter_(1, slots, pos)
            steps.append(DecodeStep(slots, n_cached, self._mask(pos, slot_pos[:, :n_cached])))
            n_used = min(self.capacity, max(n_used, int(slots.max()) + 1))
        plan = CachePlan(rows, input_pos % self.capacity, 0, self.n_used, False, steps[-1].mask, steps=steps,
                         undo=[])
        self._speculating.append(plan)
        return plan

    def commit(self, plan: CachePlan, input_pos: torch.Tensor) -> None:
        """Record the positions written by the forward pass that used `plan`."""
        if plan.steps is not None:  # speculative: positions are committed by accept()
            plan.input_pos = input_pos
            return
        self._record(plan.rows, plan.slots, input_pos[:, plan.write_from:])

    def _record(self, rows: Rows, slots: torch.Tensor, pos: torch.Tensor) -> None:
        """slots, pos (B, T): the rows' slots now hold these positions."""
        if rows is None or isinstance(rows, slice):
            self.slot_pos[rows or slice(None)].scatter_(1, slots, pos)
        else:
            self.slot_pos[rows[:, None], slots] = pos
        self.n_used = min(self.capacity, max(self.n_used, int(slots.max()) + 1))

    def update(self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, n_kv_head, T, head_dim) for the new tokens. Writes them; returns the keys and
        values attention should use, (B, n_kv_head, n_keys, head_dim), in the order of `plan.mask`."""
        kc, vc = self.k[layer], self.v[layer]  # (B_all, n_kv_head, S, head_dim)
        rows = slice(None) if plan.rows is None else plan.rows
        if plan.append_new:
            k_all = torch.cat([kc[rows, :, :plan.n_cached], k], dim=2)
            v_all = torch.cat([vc[rows, :, :plan.n_cached], v], dim=2)
        self._write(layer, plan.rows, plan.slots, k[:, :, plan.write_from:], v[:, :, plan.write_from:])
        if plan.append_new:
            return k_all, v_all
        return kc[rows, :, :plan.n_cached], vc[rows, :, :plan.n_cached]  # views unless rows is a tensor

    # ---- speculative decoding: attend as decode would, keep only the accepted tokens -----------

    def speculate(self) -> None:
        """The next forward pass is a verify pass (`update_step` per token); `accept(n)` then keeps
        its first n tokens and restores what the others overwrote."""
        self._speculating = []

    @property
    def speculating(self) -> bool:
        return self._speculating is not None

    def save_for_accept(self, plan: CachePlan, row: int) -> None:
        """For a verify pass that writes every layer's slots itself (fused decode): save, as
        update_step would, what its T tokens will overwrite in cache row `row`."""
        slots = torch.cat([s.slots[0] for s in plan.steps])  # (T,)
        k, v = self.k[:, row][:, :, slots], self.v[:, row][:, :, slots]  # (L, nkv, T, hd) copies
        plan.undo = [[(k[layer, None, :, t:t + 1], v[layer, None, :, t:t + 1]) for t in range(len(slots))]
                     for layer in range(k.shape[0])]

    def update_step(self, layer: int, plan: CachePlan, t: int, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token t of a verify pass, k, v (B, n_kv_head, 1, head_dim): written to its slot as decode
        writes it (the old entry saved for `accept`); returns the keys and values decode would attend
        over, (B, n_kv_head, n_cached, head_dim), views unless rows is a tensor."""
        step, rows = plan.steps[t], slice(None) if plan.rows is None else plan.rows
        if t == 0:
            plan.undo.append([])
        r = row_index(plan.rows, k.shape[0], k.device)[:, None]
        kc, vc = self.k[layer], self.v[layer]
        # the old entries, (B, n_kv_head, 1, head_dim) like k and v, for _write to put back
        plan.undo[layer].append((kc[r, :, step.slots].transpose(1, 2).clone(),
                                 vc[r, :, step.slots].transpose(1, 2).clone()))
        self._write(layer, plan.rows, step.slots, k, v)
        return kc[rows, :, :step.n_cached], vc[rows, :, :step.n_cached]

    def accept(self, n: int) -> None:
        plans, self._speculating = self._speculating, None
        if not plans:
            return
        (plan,) = plans
        for layer, saved in enumerate(plan.undo):  # rejected tokens (or all, if the pass failed)
            for t in reversed(range(n if plan.input_pos is not None else 0, len(saved))):
                self._write(layer, plan.rows, plan.steps[t].slots, *saved[t])
        if plan.input_pos is None:
            return
        for t, step in enumerate(plan.steps[:n]):  # record positions as n decode steps would
            self._record(plan.rows, step.slots, plan.input_pos[:, t:t + 1])

    def _write(self, layer: int, rows: Rows, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, n_kv_head, T, head_dim) into the rows' slots (B, T)."""
        r = row_index(rows, k.shape[0], k.device)
        # Advanced indices (rows, slots) around a slice put their dims first: value is (B, T, n_kv, hd).
        self.k[layer][r[:, None], :, slots] = k.transpose(1, 2)
        self.v[layer][r[:, None], :, slots] = v.transpose(1, 2)

    # ---- whole rows: moving sequences between rows and in and out of a prefix cache -------------

    def move_row(self, src: int, dst: int) -> None:
        self.k[:, dst], self.v[:, dst] = self.k[:, src], self.v[:, src]
        self.slot_pos[dst] = self.slot_pos[src]

    def read_row(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of a row's live entries in position order: k, v (L, n_kv, m, hd) and positions (m,)."""
        pos = self.slot_pos[row]
        order = pos.argsort()
        order = order[pos[order] >= 0]
        return self.k[:, row][:, :, order].clone(), self.v[:, row][:, :, order].clone(), pos[order].clone()

    def write_row(self, row: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Replace a row's content with entries at positions `pos` (m,), k/v (L, n_kv, m, hd)."""
        self.slot_pos[row] = -1
        if pos.numel() == 0:
            return
        slots = pos % self.capacity
        self.k[:, row, :, slots] = k  # an int and one index tensor: dims stay in place, (L, n_kv, m, hd)
        self.v[:, row, :, slots] = v
        self.slot_pos[row, slots] = pos
        self.n_used = min(self.capacity, max(self.n_used, int(slots.max()) + 1))

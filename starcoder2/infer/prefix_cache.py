"""Prefix cache: KV snapshots of earlier prompts, reused when a new prompt starts with the same tokens.

The editor case: the same file is sent again with one more keystroke, so all but the last few
hundred tokens were already computed. Entries are copies of a cache row (positions in order), kept
in LRU order and bounded by a total number of tokens.

Correct with the sliding window: reusing r tokens means the first new query (position r) needs the
keys at positions max(0, r - W + 1) .. r - 1, so an entry is usable for r only when it holds all of
them. A long prompt's entry holds only its last W positions; it serves prompts that extend it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PrefixEntry:
    ids: tuple[int, ...]
    k: torch.Tensor  # (L, n_kv_head, m, hd), positions pos[0] .. pos[-1] in order
    v: torch.Tensor
    pos: torch.Tensor  # (m,) consecutive positions

    @property
    def first(self) -> int:
        return int(self.pos[0]) if self.pos.numel() else 0

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v, pos for positions [start, stop)."""
        a, b = start - self.first, stop - self.first
        return self.k[:, :, a:b], self.v[:, :, a:b], self.pos[a:b]


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = torch.tensor(a[:n])
    diff = (x != torch.tensor(b[:n])).nonzero()
    return int(diff[0]) if diff.numel() else n


class PrefixCache:
    def __init__(self, max_tokens: int, window: int | None, min_tokens: int = 16):
        self.max_tokens = max_tokens
        self.window = window
        self.min_tokens = min_tokens  # shorter reuse is not worth a copy
        self.entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self.tokens = 0
        self.hits = self.misses = self.reused_tokens = 0

    def needed_from(self, r: int) -> int:
        return 0 if self.window is None else max(0, r - self.window + 1)

    def lookup(self, ids: list[int]) -> tuple[int, PrefixEntry | None]:
        """The longest usable reuse (tokens, entry); at least one prompt token is always left to run."""
        best, best_entry = 0, None
        for entry in self.entries.values():
            r = min(common_prefix(entry.ids, ids), len(ids) - 1)
            if r > best and r <= entry.first + entry.pos.numel() and entry.first <= self.needed_from(r):
                best, best_entry = r, entry
        if best_entry is None or best < self.min_tokens:
            self.misses += 1
            return 0, None
        self.entries.move_to_end(best_entry.ids)
        self.hits += 1
        self.reused_tokens += best
        return best, best_entry

    def store(self, ids: list[int], k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        key = tuple(ids)
        if len(key) < self.min_tokens or pos.numel() > self.max_tokens:
            return
        # An entry whose ids are a prefix of the new one is subsumed by it (when it holds the window).
        for old in [e for e in self.entries.values() if len(e.ids) <= len(key) and key[:len(e.ids)] == e.ids]:
            if int(pos[0]) <= old.first:
                self._drop(old.ids)
        if key in self.entries:
            self._drop(key)
        self.entries[key] = PrefixEntry(key, k, v, pos)
        self.tokens += pos.numel()
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self.entries)))  # least recently used first

    def _drop(self, key: tuple[int, ...]) -> None:
        self.tokens -= self.entries.pop(key).pos.numel()

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0

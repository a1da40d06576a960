"""Training batches from token shards: packed windows, FIM, a resumable position (reference §3.12).

Windows follow Megatron: window i holds tokens [i*S, i*S + S + 1) of the shards read end to end
(documents cross window edges, the last id of one window is the first of the next), so a window
gives S inputs and S next-token labels. Each epoch visits windows in a permutation drawn from
(seed, epoch); every sample's FIM choices come from an RNG seeded by (seed, epoch, window index), so
ranks and resumed runs make the same choices without sharing state. Rank r of W takes every W-th
position of the permutation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .fim import FIMConfig, FIMTokens, apply_fim
from .shards import Shard

IGNORE_INDEX = -100  # labels the loss skips (F.cross_entropy's default ignore_index)


def open_shards(data_dir: str | Path, split: str) -> list[Shard]:
    """The shards of `split` ("train" or "valid") listed in the pipeline's manifest, in order."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{data_dir}: no manifest.json (run `starcoder2 data prepare`)")
    manifest = json.loads(manifest_path.read_text())
    return [Shard(data_dir / s["file"], manifest["dtype"]) for s in manifest["shards"] if s["split"] == split]


class PackedWindows:
    """Fixed-length windows over shards read end to end; `window(i)` -> (S + 1,) int64 ids."""

    def __init__(self, shards: list[Shard], seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        sizes = [len(s.tokens) for s in shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (num_shards + 1,)
        total = int(self.offsets[-1])
        self.num_windows = max(0, (total - 1) // seq_len)
        self.num_tokens = total

    def __len__(self) -> int:
        return self.num_windows

    def window(self, i: int) -> np.ndarray:
        start, stop = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        parts = []
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            lo = start - int(self.offsets[k])
            take = min(stop - start, len(self.shards[k].tokens) - lo)
            parts.append(np.asarray(self.shards[k].tokens[lo : lo + take], dtype=np.int64))
            start += take
            k += 1
        return np.concatenate(parts)


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0  # batches already yielded in this epoch (per rank)


class BatchLoader:
    """Yields (input_ids, labels) of shape (B, S); `state_dict()` / `load_state_dict()` resume it."""

    def __init__(self, windows: PackedWindows, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 tokenizer: Tokenizer | None = None, fim: FIMConfig | None = None,
                 rank: int = 0, world_size: int = 1):
        if len(windows) < batch_size * world_size:
            raise ValueError(f"{len(windows)} windows of {windows.seq_len + 1} tokens cannot fill one batch of "
                             f"{batch_size} x {world_size} ranks: prepare more data or lower seq_len/batch")
        self.windows, self.batch_size, self.seed, self.shuffle = windows, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.fim = fim if fim and fim.rate > 0 else None
        self.tokenizer = tokenizer
        self.fim_tokens = FIMTokens.from_tokenizer(tokenizer, fim.split_token) if self.fim else None
        self.pad_id = self.fim_tokens.pad if self.fim_tokens else None
        self.state = LoaderState()

    @property
    def batches_per_epoch(self) -> int:
        return len(self.windows) // (self.batch_size * self.world_size)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.windows)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def sample(self, epoch: int, index: int) -> np.ndarray:
        ids = self.windows.window(index)
        if self.fim:
            rng = np.random.default_rng([self.seed, epoch, index, 0xF13])
            ids = apply_fim(ids, self.tokenizer, self.fim_tokens, self.fim, rng)
        return ids

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state.position >= self.batches_per_epoch:
            self.state = LoaderState(self.state.epoch + 1, 0)
        order = self._order(self.state.epoch)
        first = self.state.position * self.batch_size * self.world_size + self.rank
        picks = order[first : first + self.batch_size * self.world_size : self.world_size]
        batch = torch.from_numpy(np.stack([self.sample(self.state.epoch, int(i)) for i in picks]))  # (B, S+1)
        self.state.position += 1
        labels = batch[:, 1:].clone()
        if self.pad_id is not None:
            labels[labels == self.pad_id] = IGNORE_INDEX  # padding after FIM re-encoding is not a target
        return batch[:, :-1], labels

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position}

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(int(state["epoch"]), int(state["position"]))

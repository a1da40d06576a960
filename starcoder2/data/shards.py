"""Token shards: datatrove/nanotron `.ds` layout, memory-mapped (reference §3.12).

`NAME.ds` holds token ids back to back (little-endian uint16 when the vocabulary fits, else uint32);
`NAME.ds.index` holds uint64 cumulative document end positions, so document d is
`tokens[index[d-1]:index[d]]`. The layout is nanotron's `Nanoset` input, so shards written here feed
that trainer too. Files are written under a temporary name and renamed when complete: a crash never
leaves a half-written shard under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Append documents (1-D id arrays) to one shard; `close()` publishes it atomically."""

    def __init__(self, path: str | Path, vocab_size: int):
        self.path = Path(path)
        self.dtype = token_dtype(vocab_size)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._tokens = open(self._tmp, "wb")
        self._ends: list[int] = []
        self.num_tokens = 0

    def write(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._tokens.write(arr.tobytes())
        self.num_tokens += len(arr)
        self._ends.append(self.num_tokens)

    def close(self) -> None:
        self._tokens.flush()
        os.fsync(self._tokens.fileno())
        self._tokens.close()
        index_tmp = self._tmp.with_name(self._tmp.name + ".index")
        np.asarray(self._ends, dtype="<u8").tofile(index_tmp)
        os.replace(index_tmp, self.path.with_name(self.path.name + ".index"))
        os.replace(self._tmp, self.path)  # the token file last: its presence means the shard is whole

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._tokens.close()
            self._tmp.unlink(missing_ok=True)


class Shard:
    """A read-only memory-mapped shard: `.tokens` (N,) and `.ends` (D,) cumulative document ends."""

    def __init__(self, path: str | Path, dtype: np.dtype | str):
        self.path = Path(path)
        size = self.path.stat().st_size
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        index = self.path.with_name(self.path.name + ".index")
        self.ends = np.fromfile(index, dtype="<u8")
        if (self.ends[-1] if len(self.ends) else 0) != len(self.tokens):
            raise ValueError(f"{self.path}: index ends at {self.ends[-1] if len(self.ends) else 0}, "
                             f"file holds {len(self.tokens)} tokens")

    def __len__(self) -> int:
        return len(self.ends)

    def document(self, i: int) -> np.ndarray:
        start = int(self.ends[i - 1]) if i else 0
        return np.asarray(self.tokens[start : int(self.ends[i])])

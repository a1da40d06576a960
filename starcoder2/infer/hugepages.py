"""Weights in transparent huge pages: decode streams every weight once per token, and in 4 KiB pages
that stream misses the TLB every 4 KiB.

Most Linux systems ship transparent huge pages in "madvise" mode: a process gets 2 MiB pages only
where it asks for them, so torch's ordinary allocations (a model read or quantized into memory) sit
in 4 KiB pages. `HugePageArena` hands out tensors from anonymous mappings advised MADV_HUGEPAGE:
the checkpoint loader reads weights straight into them (`empty`), and `adopt` moves what was built
elsewhere (quantized layers, the int8 head) one tensor at a time, so peak memory grows by one
tensor, not by the model.

Measured on the 2-core AVX2 EPYC (benchmarks/bench_hugepages.py: the same kernel over the same
shapes in 4 KiB and in huge pages, alternating rounds in one process): weight reads +3-16 % (fp32
1.03-1.13x, int8 1.06x, int4 1.01-1.16x over five runs). The price is paid once, at load: where free
memory is fragmented (e.g. by a full page cache) the kernel compacts it to find 2 MiB pages, up to
~3 s per GB (3B fp32 load 23 -> 42 s on that machine; seconds when memory is not fragmented).
STARCODER2_HUGEPAGES=0 turns it off (e.g. one-shot completions of a large model). Where huge pages
are unavailable (not Linux, "never") the arena hands out ordinary tensors: an optimisation, never a
requirement.
"""

from __future__ import annotations

import mmap
import os

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line


def hugepages_available() -> bool:
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def hugepage_buffer(nbytes: int) -> torch.Tensor | None:
    """A uint8 tensor of nbytes in memory advised MADV_HUGEPAGE, starting on a 2 MiB boundary (huge
    pages need aligned virtual addresses); None where huge pages are unavailable. The mapping is
    unmapped when the last tensor viewing it is freed."""
    if not hugepages_available():
        return None
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps `region` alive
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


class HugePageArena:
    """Bump allocator over huge-page mappings of `chunk` bytes; a tensor larger than a chunk gets its
    own mapping (freed with it: e.g. a float embedding dropped once quantized). Holds no memory
    itself: a chunk lives as long as a tensor in it does."""

    def __init__(self, chunk: int = 256 << 20):
        self.enabled = hugepages_available() and os.environ.get("STARCODER2_HUGEPAGES", "1") != "0"
        self.chunk = chunk
        self._free: torch.Tensor | None = None  # the rest of the current chunk
        self._ranges: list[tuple[int, int]] = []  # [start, end) addresses of every mapping made

    def _bytes(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.chunk:
            buf = hugepage_buffer(nbytes)
            self._ranges.append((buf.data_ptr(), buf.data_ptr() + nbytes))
            return buf
        if self._free is None or self._free.numel() < nbytes:
            self._free = hugepage_buffer(self.chunk)
            self._ranges.append((self._free.data_ptr(), self._free.data_ptr() + self.chunk))
        buf, used = self._free[:nbytes], -(-nbytes // ALIGN) * ALIGN
        self._free = self._free[used:] if used < self._free.numel() else None
        return buf

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor, in huge pages where available."""
        n = torch.Size(shape).numel() * dtype.itemsize
        if not self.enabled or n == 0:
            return torch.empty(shape, dtype=dtype)
        return self._bytes(n).view(dtype).view(shape)

    def owns(self, t: torch.Tensor) -> bool:
        p = t.data_ptr()
        return any(a <= p < b for a, b in self._ranges)

    @torch.no_grad()
    def adopt(self, model: nn.Module) -> int:
        """Move every CPU parameter and buffer of the model not already here into the arena, in place
        (Parameter objects stay the same, so tied weights stay tied; a tensor shared by several
        modules moves once). Returns the bytes moved."""
        if not self.enabled:
            return 0
        owners: dict[int, list[tuple[dict, str]]] = {}  # storage address -> (module store, name)
        for mod in model.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is not None and t.device.type == "cpu" and t.numel() and not self.owns(t):
                        owners.setdefault(t.data_ptr(), []).append((store, name))
        moved = 0
        for group in owners.values():
            store, name = group[0]
            t = store[name]
            dst = self.empty(t.shape, t.dtype).copy_(t)
            for store, name in group:
                if isinstance(store[name], nn.Parameter):
                    store[name].data = dst
                else:
                    store[name] = dst
            moved += t.numel() * t.element_size()
            del t  # the old storage is freed here, before the next tensor is copied
        return moved

"""Do decode kernels read weights faster from transparent huge pages? The same native product over
L matrices (3B c_fc shape, 12288 x 3072, ~0.6 GB of int4 or more), once with the weights in ordinary
4 KiB pages and once in a MADV_HUGEPAGE arena, alternating round by round in one process so that the
machine's drift hits both alike.

    python benchmarks/bench_hugepages.py                       # fp32, int8, int4; 16 rounds
    python benchmarks/bench_hugepages.py --kinds int4 --rounds 32 --json out.json

Prints weight bytes read per second (median and best over rounds) per page size and their ratio.
Needs the native kernels (AVX2 or AVX-512) and Linux THP in "madvise" or "always" mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from starcoder2.infer.hugepages import HugePageArena, hugepages_available
from starcoder2.kernels import native

N, K, G = 12288, 3072, 128


def weights(kind: str, count: int, empty) -> tuple[list[torch.Tensor], callable]:
    """count random weight matrices of `kind` made by empty(shape, dtype), and y = f(x, w)."""
    k = native()
    if kind == "fp32":
        ws = [empty((N, K), torch.float32).normal_() for _ in range(count)]
        return ws, lambda x, w: k.linear(x, w, None)
    if kind == "int8":
        ws = [empty((N, K), torch.uint8).random_(0, 256) for _ in range(count)]
        scale = torch.rand(N)
        return ws, lambda x, w: k.linear_int8(x, w, scale, None)
    ws = [empty((N, K // 2), torch.uint8).random_(0, 256) for _ in range(count)]
    scale, lo = torch.rand(N, K // G), torch.rand(N, K // G)
    return ws, lambda x, w: k.linear_int4(x, w, scale, lo, G, None)


def anon_huge_gb() -> float:
    """This process's anonymous memory in huge pages (what the kernel actually granted)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="fp32,int8,int4")
    ap.add_argument("--gb", type=float, default=0.6, help="weight bytes per page size and kind (> the L3 cache)")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if native() is None or not hugepages_available():
        raise SystemExit("needs the native kernels and transparent huge pages")
    torch.set_num_threads(args.threads)
    x = torch.randn(1, K)
    rows = []
    print("| weights | 4 KiB pages GB/s (median, best) | huge pages GB/s (median, best) | huge / 4 KiB (medians) |")
    print("|---|---|---|---|")
    for kind in args.kinds.split(","):
        nbytes = {"fp32": N * K * 4, "int8": N * K, "int4": N * K // 2}[kind]
        count = max(2, int(args.gb * 1e9 / nbytes))
        before = anon_huge_gb()
        sets = {"4k": weights(kind, count, lambda s, d: torch.empty(s, dtype=d)),
                "huge": weights(kind, count, HugePageArena().empty)}
        granted = anon_huge_gb() - before
        rates: dict[str, list[float]] = {"4k": [], "huge": []}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, (ws, f) in sets.items():
                t = time.perf_counter()
                for w in ws:
                    f(x, w)
                rates[name].append(count * nbytes / (time.perf_counter() - t) / 1e9)
        med = {n: statistics.median(r[1:]) for n, r in rates.items()}
        best = {n: max(r[1:]) for n, r in rates.items()}
        rows.append({"kind": kind, "matrices": count, "median_gbs": med, "best_gbs": best, "rounds": rates,
                     "huge_granted_gb": granted, "weight_gb": count * nbytes / 1e9})
        print(f"| {kind} ({count} x {N}x{K}; {granted:.2f} of {count * nbytes / 1e9:.2f} GB in huge pages) | "
              f"{med['4k']:.1f}, {best['4k']:.1f} | {med['huge']:.1f}, {best['huge']:.1f} | {med['huge'] / med['4k']:.2f}x |")
        del sets
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "results": rows}, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Core CPU benchmark: ours vs transformers' Starcoder2ForCausalLM, fp32 and bf16, same weights.

A thin wrapper over `starcoder2 bench` (starcoder2/bench.py, where the protocol, the subprocess
workers, the contention accounting and the docs live): it keeps this script's options and runs the
variants ours-{dtype} and transformers-{dtype} for each --dtypes entry, batch-1 decode, prefill-512
and TTFT-512 only (no batch-8, no engine scenarios). Differences from the script it replaced:
"ours bf16" is now what `starcoder2.load` gives (native AVX-512 decode kernels; the plain torch path
is the variant ours-bf16-torch of `starcoder2 bench`), ours' decode runs through the Engine, and the
old "prefill via the KV-cache path" is the TTFT-512 column (--no-cache-prefill leaves it out).

    .venv/bin/python benchmarks/bench_core.py                          # full 3B, fp32+bf16, ~15+ min
    .venv/bin/python benchmarks/bench_core.py --dtypes bf16 --json out.json
    .venv/bin/python benchmarks/bench_core.py --layers 2 --reps 1      # scaled-down smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from starcoder2 import bench  # noqa: E402 - after the path fix-up


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16")
    p.add_argument("--peers", default="ours,transformers", help="comma-separated: ours,transformers")
    p.add_argument("--layers", help="override num_layers (scaled-down run)")
    p.add_argument("--reps", default="3")
    p.add_argument("--threads", default="2")
    p.add_argument("--workdir", default="/tmp/sc2-bench", help="checkpoint cache directory")
    p.add_argument("--json", metavar="OUT", help="write the raw results here")
    p.add_argument("--no-cache-prefill", dest="cache_prefill", action="store_false",
                   help="leave out TTFT-512 (ours' prefill through the KV-cache path)")
    args = p.parse_args(argv)
    variants = [f"{peer.strip()}-{d.strip()}" for d in args.dtypes.split(",") for peer in args.peers.split(",")]
    skip = "batch,keystroke,speculation" + ("" if args.cache_prefill else ",ttft")
    out = ["--variants", ",".join(variants), "--skip", skip, "--reps", args.reps, "--threads", args.threads,
           "--workdir", args.workdir]
    out += ["--layers", args.layers] if args.layers else []
    out += ["--json", args.json] if args.json else []
    return bench.main(out, prog="bench_core.py")


if __name__ == "__main__":
    sys.exit(main())

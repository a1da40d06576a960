"""Fused decode vs the module path: decode steps of one model through the Engine with the fused
native decoder (starcoder2/infer/fused.py) and without it, alternating round by round in one process
so that the machine's drift hits both alike, at several context lengths.

    python benchmarks/bench_fused.py --model CKPT --quantize int4         # contexts 128 and 2000
    python benchmarks/bench_fused.py --model CKPT --contexts 128 --rounds 8 --json out.json

Prints decode tok/s (median and best over rounds) per path and context, and the ratio. CKPT: any
checkpoint, e.g. the 3B random one `starcoder2 bench` caches under its --workdir. Needs the AVX2
native build (elsewhere there is no fused decoder to compare).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from starcoder2.api import load_for_inference
from starcoder2.infer.engine import Engine
from starcoder2.infer.fused import FusedDecoder
from starcoder2.infer.generate import SamplingParams


def decode_rate(engine: Engine, context: int, tokens: int) -> float:
    """tok/s over decode steps 2..tokens of one request with a `context`-token prompt."""
    req = engine.submit([100 + i % 1000 for i in range(context)], SamplingParams(max_new_tokens=tokens + 1))
    engine.step()  # prefill and the first token
    engine.step()
    t, n = time.perf_counter(), 0
    while not req.finished:
        engine.step()
        n += 1
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--quantize", choices=["int8", "int4"])
    ap.add_argument("--contexts", default="128,2000")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg = load_for_inference(args.model, None, "cpu", args.quantize)
    fused = FusedDecoder.build(model)
    if fused is None:
        raise SystemExit("no fused decoder for this model on this machine (it needs the AVX2 native build "
                         "and fp32 activations)")
    contexts = [int(c) for c in args.contexts.split(",")]
    # one engine per context (a cache's slots used by a longer prompt stay in every later step's
    # attention span, masked); the prefix cache keeps the prompt's KV: later rounds only decode
    engines = {c: Engine(model, max_batch=1, max_seq_len=c + args.tokens + 8, prefix_cache_tokens=2 * c)
               for c in contexts}
    rates: dict[str, dict[int, list[float]]] = {"fused": {c: [] for c in contexts}, "modules": {c: [] for c in contexts}}
    for r in range(args.rounds):
        for path in ("fused", "modules"):
            for c in contexts:
                engines[c].fused = fused if path == "fused" else None
                rates[path][c].append(decode_rate(engines[c], c, args.tokens))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{p} {c}: {rates[p][c][-1]:.2f}" for p in rates for c in contexts), flush=True)
    print(f"\n{args.model.name} {args.quantize or 'as stored'}, {args.threads} threads, {args.rounds} rounds, "
          f"decode tok/s over {args.tokens} tokens\n")
    print("| context | modules: median (best) | fused: median (best) | fused / modules (medians) |")
    print("|---|---|---|---|")
    out = {"model": str(args.model), "quantize": args.quantize, "rounds": args.rounds, "tokens": args.tokens,
           "rates": {p: {str(c): v for c, v in d.items()} for p, d in rates.items()}}
    for c in contexts:
        m, f = (statistics.median(rates[p][c]) for p in ("modules", "fused"))
        print(f"| {c} | {m:.2f} ({max(rates['modules'][c]):.2f}) | {f:.2f} ({max(rates['fused'][c]):.2f}) | "
              f"**{f / m:.2f}x** |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

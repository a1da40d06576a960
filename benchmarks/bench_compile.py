"""Is `torch.compile` worth it for decode? Batch-1 greedy decode through the model's KV-cache path,
eager beside `torch.compile(dynamic=True)` of the same step, in one process, on random weights.

    python benchmarks/bench_compile.py                                  # embedded and 100m presets, fp32
    python benchmarks/bench_compile.py --presets 3b --dtype bf16 --steps 32 --json out.json

Prints a table (compile warm-up, decode tok/s, ratio) and checks that both produce the same tokens.
The cache's bookkeeping reads positions on the host (`int(input_pos.max())` in KVCache.plan), which
breaks the compiled graph every step: this measures the engine's decode as it is, not a static-shape
rewrite of it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from starcoder2.config import preset
from starcoder2.device import resolve_dtype
from starcoder2.kv_cache import KVCache
from starcoder2.model import StarCoder2

PROMPT = 128  # tokens prefilled before decoding


def decode(model: StarCoder2, step, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    """Prefill `prompt` (1, T), then n greedy steps through `step`; (seconds for the n steps, tokens)."""
    cfg = model.config
    cache = KVCache(cfg, 1, prompt.shape[1] + n + 1, dtype=model.embed_tokens.weight.dtype)
    with torch.inference_mode():
        h = model.hidden_states(prompt, torch.arange(prompt.shape[1])[None], cache)
        tok = model.logits(h[:, -1]).argmax(-1)[:, None]  # (1, 1)
        out = []
        t = time.perf_counter()
        for i in range(n):
            tok = step(tok, torch.tensor([[prompt.shape[1] + i]]), cache).argmax(-1)[:, None]
            out.append(int(tok))
    return time.perf_counter() - t, out


def measure(name: str, dtype: torch.dtype, steps: int) -> dict:
    torch.manual_seed(0)
    cfg = preset(name)
    model = StarCoder2(cfg).to(dtype).eval()
    model.init_weights()
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT))

    def step(ids, pos, cache):  # (1, 1) ids at (1, 1) positions -> (1, V) logits
        return model.logits(model.hidden_states(ids, pos, cache)[:, -1])

    row = {"preset": name, "params": cfg.num_params, "dtype": str(dtype).removeprefix("torch."), "steps": steps}
    for mode, fn in (("eager", step), ("compiled", torch.compile(step, dynamic=True))):
        t0 = time.perf_counter()
        decode(model, fn, prompt, 8)  # warm-up: compilation happens here
        row[f"{mode}_warmup_s"] = time.perf_counter() - t0
        seconds, tokens = decode(model, fn, prompt, steps)
        row[f"{mode}_tok_s"], row[f"{mode}_tokens"] = steps / seconds, tokens
    row["ratio"] = row["compiled_tok_s"] / row["eager_tok_s"]
    row["same_tokens"] = row.pop("eager_tokens") == row.pop("compiled_tokens")
    return row


def table(rows: list[dict]) -> str:
    lines = ["| preset | params | dtype | eager tok/s | compiled tok/s | compiled / eager | compile warm-up s | same tokens |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['preset']} | {r['params'] / 1e6:.0f}M | {r['dtype']} | {r['eager_tok_s']:.1f} | "
              f"{r['compiled_tok_s']:.1f} | {r['ratio']:.2f}x | {r['compiled_warmup_s']:.0f} | {r['same_tokens']} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="embedded,100m")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | auto")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    rows = [measure(name.strip(), dtype, args.steps) for name in args.presets.split(",") if name.strip()]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "results": rows},
                                              indent=2) + "\n")
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

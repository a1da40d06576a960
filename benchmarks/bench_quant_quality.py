"""What weight-only quantization costs in quality: held-out loss, perplexity, bits per byte and logits
error of bf16 / int8 / int4 (plain rounding vs AWQ calibration) against the fp32 model.

    python benchmarks/bench_quant_quality.py                       # the embedded model, its held-out split
    python benchmarks/bench_quant_quality.py --model DIR --data DATA_DIR --windows 32 --json out.json

DATA_DIR is a `starcoder2 data prepare` output (valid split = held-out files; calibration windows for
AWQ come from the train split, never from the held-out files).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from starcoder2.api import default_model_path
from starcoder2.checkpoint import load_model
from starcoder2.data.loader import BatchLoader, PackedWindows, open_shards
from starcoder2.infer.quantize import quantize_model
from starcoder2.tokenizer import Tokenizer


def windows(data: Path, split: str, n: int, seq_len: int) -> torch.Tensor:
    loader = BatchLoader(PackedWindows(open_shards(data, split), seq_len), n, shuffle=split == "train", seed=1)
    x, y = loader.next_batch()
    return torch.cat([x, y[:, -1:]], dim=1)  # (n, seq_len + 1)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, ref_logits: torch.Tensor | None, nbytes: int, batch: int = 4) -> dict:
    total, logits_all = 0.0, []
    for i in range(0, len(ids), batch):
        x = ids[i : i + batch]
        logits = model(x[:, :-1]).float()  # (b, S, V)
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        logits_all.append(logits)
    logits = torch.cat(logits_all)
    n = ids[:, 1:].numel()
    out = {"loss": total / n, "ppl": math.exp(total / n), "bpb": total / math.log(2) / nbytes}
    if ref_logits is not None:
        d = (logits - ref_logits).abs()
        out.update(max_abs_logit_err=d.max().item(), mean_abs_logit_err=d.mean().item(),
                   top1_agree=(logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item())
    return out, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--data", default="runs/embedded/data", help="prepared data with a valid split")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows to score")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calibration", type=int, default=16, help="train windows for AWQ")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = Path(args.model) if args.model else default_model_path()
    data = Path(args.data)
    tok = Tokenizer.from_dir(path)
    held = windows(data, "valid", args.windows, args.seq_len)
    calib = windows(data, "train", args.calibration, args.seq_len)
    nbytes = sum(len(tok.decode(r[1:].tolist()).encode()) for r in held)

    variants = [("fp32", None, None, False), ("bf16", None, None, False), ("int8", "int8", 128, False),
                ("int4 g128", "int4", 128, False), ("int4 g128 + AWQ", "int4", 128, True),
                ("int4 g64", "int4", 64, False), ("int4 g64 + AWQ", "int4", 64, True)]
    rows, ref = [], None
    for name, mode, group, awq in variants:
        t = time.perf_counter()
        model, _ = load_model(path, torch.float32 if name == "fp32" else torch.bfloat16, "cpu")
        if mode:
            model.float()  # AWQ statistics and scale search on the float model
            quantize_model(model, mode, group_size=group, calibration=[calib[i : i + 4] for i in range(0, len(calib), 4)]
                           if awq else None, dtype=torch.bfloat16)
        model.eval()
        result, logits = evaluate(model, held, ref, nbytes)
        if ref is None:
            ref = logits
        rows.append({"variant": name, **result, "seconds": time.perf_counter() - t})
        del model

    print(f"{path.name}: {args.windows} held-out windows x {args.seq_len} tokens ({nbytes:,} bytes); "
          f"AWQ calibrated on {args.calibration} train windows")
    print("| variant | loss | ppl | bits/byte | Δloss vs fp32 | max |Δlogit| | mean |Δlogit| | top-1 agree |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0]["loss"]
    for r in rows:
        print(f"| {r['variant']} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['bpb']:.4f} | {r['loss'] - base:+.4f} | "
              f"{r.get('max_abs_logit_err', 0):.3f} | {r.get('mean_abs_logit_err', 0):.4f} | {r.get('top1_agree', 1):.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(path), "windows": args.windows, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

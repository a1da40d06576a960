"""Load time and peak memory of a pre-quantized checkpoint (`starcoder2 convert --quantize`) against
quantizing the bf16 checkpoint at load, for int8 and int4, on the StarCoder2-3B shape (random
weights: load cost does not depend on their values).

    nice -n 19 python benchmarks/bench_prequantized.py                 # 3B shape, 2 reps, ~10 min on 2 cores
    python benchmarks/bench_prequantized.py --preset tiny --reps 1     # smoke run

Each load runs in a fresh process (its peak RSS is its own, `ru_maxrss`), page cache warm (the files
are read once before timing). Each run also returns the logits of a fixed 8-token prompt: the
pre-quantized load must give exactly the logits of quantize-at-load. Writes docs/bench_prequantized.json
and .png. Leaves out: cold page cache, GPUs, other shapes than the one given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 42, 99, 7, 300, 12, 8]


def worker(path: str, quantize: str | None, threads: int) -> dict:
    """One load in this process: wall time, peak RSS, last-position logits of PROMPT."""
    import resource

    import torch

    from starcoder2.api import load_for_inference

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, _ = load_for_inference(Path(path), "bf16", "cpu", quantize=quantize)
    load_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT]))[0, -1].float()
    # memory-mapped weights become resident only when first used: the peak after one forward pass
    # is the memory a served model needs
    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"load_s": load_s, "peak_rss_gib": rss / 2**30, "peak_rss_used_gib": used / 2**30,
            "logits": logits.tolist()}


def spawn(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def prequantize(src: Path, out: Path, mode: str) -> None:
    """A pre-quantized copy of `src`, as `starcoder2 convert --quantize` writes it (in a subprocess
    so that this process stays small)."""
    if (out / "config.json").is_file():
        return
    print(f"converting {src.name} -> {out.name}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "starcoder2.cli", "convert", str(src), "--quantize", mode,
                    "--out", str(out)], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def plot(rows: list[dict], path: Path, preset: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = [f"{r['mode']}\n{'at load' if r['how'] == 'quantize at load' else 'pre-quantized'}" for r in rows]
    for ax, key, title in ((axes[0], "load_s", "load time (s)"),
                           (axes[1], "peak_rss_used_gib", "peak RSS after 1st forward (GiB)")):
        ax.bar(labels, [r[key] for r in rows], color=["#999" if r["how"] == "quantize at load" else "#3a7"
                                                        for r in rows])
        ax.set_title(title)
    fig.suptitle(f"pre-quantized checkpoint vs quantize at load ({preset} shape)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="3b")
    p.add_argument("--workdir", default="/tmp/sc2-bench", help="random checkpoints are cached here (as in `bench`)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "docs" / "bench_prequantized.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "bench_prequantized.png"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quantize", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.quantize, args.threads)))
        return

    from starcoder2.bench import bench_config, ensure_checkpoint

    workdir = Path(args.workdir)
    src = ensure_checkpoint(workdir, bench_config(args.preset), args.threads)
    rows = []
    for mode in ("int8", "int4"):
        pre = workdir / f"{src.name}-{mode}"
        prequantize(src, pre, mode)
        runs = {}
        for how, path, q in (("quantize at load", src, mode), ("pre-quantized", pre, None)):
            warm(path)
            reps = [spawn(["--worker", str(path), "--threads", str(args.threads)] + (["--quantize", q] if q else []),
                          args.threads) for _ in range(args.reps)]
            runs[how] = reps
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            rows.append({"mode": mode, "how": how, "load_s": statistics.median(r["load_s"] for r in reps),
                         "load_s_all": [round(r["load_s"], 2) for r in reps],
                         "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in reps),
                         "peak_rss_used_gib": statistics.median(r["peak_rss_used_gib"] for r in reps),
                         "file_gb": size / 1e9})
        same = runs["quantize at load"][0]["logits"] == runs["pre-quantized"][0]["logits"]
        rows[-1]["logits_identical_to_quantize_at_load"] = same
        if not same:
            print(f"WARNING: {mode} pre-quantized logits differ from quantize-at-load", file=sys.stderr)

    print(f"\n{args.preset} shape, {args.threads} threads, median of {args.reps} fresh processes, page cache warm\n")
    print("| quantization | how | load s | peak RSS GiB at load | after 1st forward | files GB | logits = at load |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        same = r.get("logits_identical_to_quantize_at_load")
        print(f"| {r['mode']} | {r['how']} | {r['load_s']:.1f} | {r['peak_rss_gib']:.2f} | "
              f"{r['peak_rss_used_gib']:.2f} | {r['file_gb']:.2f} | "
              f"{'' if same is None else 'yes' if same else 'NO'} |")
    Path(args.json).write_text(json.dumps({"preset": args.preset, "threads": args.threads, "reps": args.reps,
                                           "rows": rows}, indent=2) + "\n")
    plot(rows, Path(args.plot), args.preset)
    print(f"\nwrote {args.json} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Fine-tuning memory and step time on the real StarCoder2-3B shape: LoRA beside full fine-tuning.

Random weights (`init_weights`), one fresh process per variant so each peak RSS (VmHWM) is its own:

    lora      the 3B shape, all 30 layers, measured: base frozen in bf16, fp32 LoRA adapters (rank
              --rank, alpha 2r, all six linears per block) injected by starcoder2.finetune.lora, exactly
              as `starcoder2 finetune --lora` builds it; AdamW over the adapters only
    full-L<n> the 3B shape cut to n layers (embedding and head whole): fp32 master weights + grads +
              AdamW moments, as `starcoder2 finetune --full` trains. 30 layers need ~16 bytes/param
              (48.5 GB for 3.03 B params) before activations: more than 24 GB, so it is measured at
              --full-layers (default 1 and 2) and extrapolated linearly per layer, labelled as such

Each step is the training loop's (starcoder2/train/loop.py): `loss_fn` under bf16 autocast,
backward, clip_grad_norm_, AdamW step. --warmup untimed steps, then --steps timed (median reported):
wall seconds, and CPU seconds of the process (user + system over all its threads), which on a shared
machine says what the step costs when wall time is stretched by other work: uncontended wall time is
about CPU seconds / threads.

    nice -n 19 .venv/bin/python benchmarks/bench_finetune.py                        # ~10 min on 2 cores
    nice -n 19 .venv/bin/python benchmarks/bench_finetune.py --preset embedded --seq 64   # smoke run
    ... --json docs/bench_finetune.json --plot docs/bench_finetune.png

Left out: data loading, evaluation and checkpointing (the loop's other work), activation
checkpointing (would cut LoRA's activation memory further), GPUs, several processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from starcoder2.adapters import TARGETS, AdapterConfig  # noqa: E402
from starcoder2.config import preset  # noqa: E402
from starcoder2.device import autocast_dtype  # noqa: E402
from starcoder2.model import StarCoder2  # noqa: E402
from starcoder2.train.loop import loss_fn  # noqa: E402
from starcoder2.train.optim import build_optimizer  # noqa: E402
from starcoder2.train.parallel import apply_activation_checkpointing  # noqa: E402

GIB = 2**30
BUDGET_GB = 24  # the target: LoRA on the 3B shape must fit a 24 GB machine


def _vm(key: str) -> float:
    """A /proc/self/status field in GiB (VmHWM: peak resident set; VmRSS: now)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 / GIB for ln in f if ln.startswith(key + ":"))


def build(cfg, method: str, rank: int, autocast: torch.dtype | None) -> torch.nn.Module:
    """Built on the meta device and materialised once in its storage dtype (no fp32 copy of a bf16 base):
    a LoRA base in the autocast dtype as `finetune` stores it, full fine-tuning in fp32."""
    dtype = (autocast or torch.float32) if method == "lora" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = StarCoder2(cfg)
        model = model.to_empty(device="cpu")
    finally:
        torch.set_default_dtype(default)
    model.init_weights(torch.Generator().manual_seed(0))
    if method == "lora":
        from starcoder2.finetune.lora import inject_lora

        inject_lora(model, AdapterConfig(r=rank, lora_alpha=2.0 * rank, lora_dropout=0.05, target_modules=TARGETS))
    return model.train()


def worker(args) -> dict:
    """One variant in this process; returns its measurements."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method, layers = ("lora", None) if args.worker == "lora" else ("full", int(args.worker.removeprefix("full-L")))
    cfg = preset(args.preset)
    full_layers = cfg.num_layers
    if layers is not None:
        cfg = cfg.replace(num_layers=layers)
    rss_start = _vm("VmRSS")
    t0 = time.perf_counter()
    autocast = autocast_dtype(args.dtype, torch.device("cpu"))  # None: fp32, no autocast
    model = build(cfg, method, args.rank, autocast)
    if args.activation_checkpointing:
        apply_activation_checkpointing(model)
    build_s = time.perf_counter() - t0
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_optimizer(model, 2e-4, 0.0, (0.9, 0.95), 1e-8)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, S) ids, next-token labels
    times, cpu, losses = [], [], []
    for i in range(args.warmup + args.steps):
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        print(f"[bench_finetune] {args.worker} step {i + 1}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return {"variant": args.worker, "method": method, "layers": cfg.num_layers, "full_layers": full_layers,
            "params": sum(p.numel() for p in model.parameters()), "trained_params": trained,
            "step_s": statistics.median(times), "step_times": times, "cpu_s": statistics.median(cpu), "losses": losses,
            "peak_rss_gib": _vm("VmHWM"), "rss_at_start_gib": rss_start, "build_s": build_s,
            "tokens_per_s": args.batch * args.seq / statistics.median(times)}


def extrapolate(rows: list[dict]) -> dict | None:
    """Full fine-tuning of every layer from two measured layer counts: a + b * layers, for memory and time."""
    full = sorted((r for r in rows if r["method"] == "full"), key=lambda r: r["layers"])
    if len(full) < 2:
        return None
    lo, hi = full[0], full[-1]
    n = hi["full_layers"]
    per = {k: (hi[k] - lo[k]) / (hi["layers"] - lo["layers"]) for k in ("peak_rss_gib", "step_s", "cpu_s")}
    return {"variant": f"full-L{n} (extrapolated)", "method": "full", "layers": n, "full_layers": n,
            "extrapolated_from": [lo["variant"], hi["variant"]], "per_layer": per,
            "peak_rss_gib": lo["peak_rss_gib"] + per["peak_rss_gib"] * (n - lo["layers"]),
            "step_s": lo["step_s"] + per["step_s"] * (n - lo["layers"]),
            "cpu_s": lo["cpu_s"] + per["cpu_s"] * (n - lo["layers"]),
            "params": preset_params(lo, hi, n), "trained_params": preset_params(lo, hi, n)}


def preset_params(lo: dict, hi: dict, n: int) -> int:
    per = (hi["params"] - lo["params"]) // (hi["layers"] - lo["layers"])
    return lo["params"] + per * (n - lo["layers"])


def table(rows: list[dict], batch: int, seq: int) -> str:
    lines = ["| variant | layers | trained params | peak RSS GB | step s (wall) | CPU s/step | tokens/s | fits 24 GB |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        label = f"**{r['variant']}**" if "extrapolated_from" in r else f"{r['variant']} (measured)"
        fits = "yes" if r["peak_rss_gib"] * GIB < BUDGET_GB * 1e9 else "no"
        lines.append(f"| {label} | {r['layers']} | {r['trained_params'] / 1e6:,.1f}M | {r['peak_rss_gib'] * GIB / 1e9:.2f} | "
                     f"{r['step_s']:.1f} | {_num(r.get('cpu_s'))} | {batch * seq / r['step_s']:.1f} | {fits} |")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def plot(rows: list[dict], out: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed; {out} not written"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    names = [r["variant"].replace(" (extrapolated)", "\n(extrapolated)") for r in rows]
    colors = ["tab:blue" if r["method"] == "lora" else "tab:gray" if "extrapolated_from" in r else "tab:orange"
              for r in rows]
    a.bar(names, [r["peak_rss_gib"] * GIB / 1e9 for r in rows], color=colors)
    a.axhline(BUDGET_GB, color="red", linestyle="--", label=f"{BUDGET_GB} GB")
    a.set_ylabel("peak RSS (GB)")
    a.legend()
    b.bar(names, [r["step_s"] for r in rows], color=colors)
    b.set_ylabel("seconds per optimizer step")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return f"plot written to {out}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="3b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full-layers", default="1,2", help="layer counts measured for full fine-tuning")
    p.add_argument("--activation-checkpointing", action="store_true", help="as `finetune --activation-checkpointing`")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp32, as `finetune --dtype` (auto: bf16 where the "
                   "CPU has bf16 instructions, else fp32)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--plot", metavar="OUT.png")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    variants = ["lora"] + [f"full-L{n.strip()}" for n in args.full_layers.split(",") if n.strip()]
    rows, notes = [], []
    for v in variants:
        cmd = [sys.executable, __file__, "--worker", v] + [f"--{k}={getattr(args, k)}" for k in
                                                            ("preset", "batch", "seq", "rank", "steps", "warmup", "threads",
                                                             "dtype")] + ["--activation-checkpointing"] * args.activation_checkpointing
        done = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(done.stderr[-2000:])
        if done.returncode != 0:
            notes.append(f"{v} failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if ext := extrapolate(rows):
        rows.append(ext)
    cfg = preset(args.preset)
    adam_bytes = 16 * cfg.num_params  # fp32 weight + grad + two AdamW moments
    notes.append(f"full fine-tuning state alone (fp32 weights, grads, AdamW m and v): 16 B x {cfg.num_params:,} = "
                 f"{adam_bytes / 1e9:.1f} GB, before activations; a bf16 copy of the base is {2 * cfg.num_params / 1e9:.1f} GB")
    ac = autocast_dtype(args.dtype, torch.device("cpu"))
    title = (f"{args.preset} shape, random weights, batch {args.batch}x{args.seq}, "
             f"{'bf16 autocast' if ac else 'fp32'}{', activation checkpointing' if args.activation_checkpointing else ''}, "
             f"{args.threads} threads, "
             f"median of {args.steps} steps")
    print(f"{title}\n\n{table(rows, args.batch, args.seq)}")
    if args.plot:
        notes.append(plot(rows, Path(args.plot), title))
    print("".join(f"\nNote: {n}" for n in notes))
    if args.json:
        env = {"torch": torch.__version__, "nproc": os.cpu_count(), "loadavg": open("/proc/loadavg").read().split()[:3],
               "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        payload = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "worker"},
                   "results": rows, "notes": notes, "table": table(rows, args.batch, args.seq)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"raw results written to {args.json}")
    return 1 if any("failed" in n for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training throughput (tokens/s) and MFU: our trainer's step beside transformers' Starcoder2ForCausalLM.

For each preset (starcoder2.config.preset), one set of weights from `StarCoder2.init_weights()` is
loaded into each implementation in turn (built just before its run, freed after, so each peak RSS
is its own plus the shared copy of the weights and the batch):

    ours               StarCoder2, the step of starcoder2/train/loop.py: `loss_fn` under bf16
                       autocast, backward, clip_grad_norm_, AdamW from `build_optimizer`
    transformers       Starcoder2ForCausalLM(Starcoder2Config(**cfg.to_hf())), same step; its loss is
                       the same fp32 cross-entropy on its logits (use_cache=False)
    ours-compiled      with --compile: `parallel.wrap(..., compile=True)`, every block torch.compile'd

Same (B, S) batch of random token ids, next-token labels, same optimizer settings (TrainConfig
defaults). --warmup untimed steps (compilation happens there), then --steps timed steps; tokens/s =
B*S / median step time. MFU = tokens/s x `flops_per_token(model, S)` / peak, peak from
`KNOWN_PEAK_FLOPS["cpu"]` (the 2-core bf16 figure) unless --peak-flops. Before timing, an fp32
forward of both models on the batch's first row checks that they hold the same weights.

    nice -n 19 .venv/bin/python benchmarks/bench_train.py --presets embedded --batch 1 --seq 64 --steps 2 --warmup 1
    .venv/bin/python benchmarks/bench_train.py --compile --json docs/bench_train.json --plot docs/bench_train.png

Left out: gradient accumulation, data loading, checkpointing, evaluation (the loop's other work),
multi-process DDP/FSDP, GPUs. One process runs the implementations in sequence, so contention on a
shared machine hits them unequally: compare within one run and look at the load average in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from starcoder2.config import preset  # noqa: E402
from starcoder2.data.loader import IGNORE_INDEX  # noqa: E402
from starcoder2.model import StarCoder2  # noqa: E402
from starcoder2.train.config import TrainConfig  # noqa: E402
from starcoder2.train.loop import KNOWN_PEAK_FLOPS, flops_per_token, loss_fn  # noqa: E402
from starcoder2.train.optim import build_optimizer  # noqa: E402
from starcoder2.train.parallel import Dist, wrap  # noqa: E402

DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # lr, betas, eps, clip, ...


def _status_gib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next((int(ln.split()[1]) / 2**20 for ln in f if ln.startswith(key + ":")), float("nan"))


def reset_peak_rss() -> None:
    """Reset VmHWM (Linux >= 4.0), so the next reading is the peak of what follows only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def build(impl: str, cfg, state: dict) -> torch.nn.Module:
    if impl == "transformers":
        from transformers import Starcoder2Config, Starcoder2ForCausalLM

        model = Starcoder2ForCausalLM(Starcoder2Config(**cfg.to_hf()))
        model.load_state_dict({k if k.startswith("lm_head.") else "model." + k: v for k, v in state.items()})
        return model.train()
    model = StarCoder2(cfg)
    model.load_state_dict(state)
    model.tie_weights()
    if impl == "ours-compiled":
        model = wrap(model, Dist(), parallel="ddp", compile=True, activation_checkpointing=False)
    return model.train()


def loss_of(impl: str, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if impl == "transformers":
        logits = model(input_ids=x, use_cache=False).logits.float()  # (B, S, V)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    return loss_fn(model, x, y)


def check_same_weights(cfg, state: dict, x: torch.Tensor) -> float:
    """Max |logit difference| of an fp32 forward of both models on (1, S) ids."""
    with torch.no_grad():
        a = build("ours", cfg, state).eval()(x)
        b = build("transformers", cfg, state).eval()(input_ids=x, use_cache=False).logits.float()
    return float((a - b).abs().max())


def run_impl(impl: str, cfg, state: dict, x, y, fpt: float, args) -> dict:
    reset_peak_rss()
    model = build(impl, cfg, state)
    opt = build_optimizer(model, DEFAULTS["lr"], DEFAULTS["weight_decay"], DEFAULTS["betas"], DEFAULTS["eps"])
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(impl, model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), DEFAULTS["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tps = x.numel() / step_s
    del model, opt
    return {"impl": impl, "step_s": step_s, "step_times": times, "tokens_per_s": tps,
            "mfu": tps * fpt / args.peak_flops, "flops_per_token": fpt, "losses": losses,
            "peak_rss_gib": _status_gib("VmHWM")}


def table(results: list[dict]) -> str:
    lines = ["| preset | params | impl | tokens/s | MFU | peak RSS GiB | ours/transformers |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else ""
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['impl']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['mfu']:.1%} | {r['peak_rss_gib']:.2f} | {ratio} |")
    return "\n".join(lines)


def plot(results: list[dict], out: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed; {out} not written"
    presets = list(dict.fromkeys(r["preset"] for r in results))
    fig, axes = plt.subplots(1, len(presets), figsize=(4.2 * len(presets), 4.2), squeeze=False)
    colors = {"ours": "tab:blue", "transformers": "tab:orange", "ours-compiled": "tab:green"}
    for ax, name in zip(axes[0], presets):
        rows = [r for r in results if r["preset"] == name]
        bars = ax.bar([r["impl"] for r in rows], [r["tokens_per_s"] for r in rows], color=[colors[r["impl"]] for r in rows])
        ax.bar_label(bars, labels=[f"MFU {r['mfu']:.1%}" for r in rows], fontsize=8)
        ax.set_title(f"{name} ({rows[0]['params'] / 1e6:.0f}M params)")
        ax.set_ylabel("training tokens/s")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title.replace("; ", "\n"), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return f"plot written to {out}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="embedded,100m", help="comma-separated starcoder2.config presets")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-flops", type=float, default=KNOWN_PEAK_FLOPS["cpu"], help="for MFU (default: %(default)g)")
    p.add_argument("--compile", action="store_true", help="add ours with torch.compile'd blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write the raw results here")
    p.add_argument("--plot", metavar="OUT.png", help="write a bar chart here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    impls = ["ours", "transformers"] + (["ours-compiled"] if args.compile else [])
    results, notes = [], []
    for name in [s.strip() for s in args.presets.split(",") if s.strip()]:
        cfg = preset(name)
        model = StarCoder2(cfg)
        model.init_weights(torch.Generator().manual_seed(args.seed))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # shared by every impl
        if cfg.tie_word_embeddings:  # one tensor under both names, as in the model
            state["lm_head.weight"] = state["embed_tokens.weight"]
        fpt = flops_per_token(model, args.seq)  # one architecture: the same for every impl
        del model
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(args.seed))
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, S) ids, next-token labels
        diff = check_same_weights(cfg, state, x[:1])
        notes.append(f"{name}: max |logits ours - transformers| (fp32, 1x{args.seq}) = {diff:.2e}")
        print(f"[bench_train] {notes[-1]}", file=sys.stderr, flush=True)
        for impl in impls:
            print(f"[bench_train] {name} {impl}: {args.warmup} warm-up + {args.steps} timed steps of "
                  f"{args.batch}x{args.seq}", file=sys.stderr, flush=True)
            try:
                r = run_impl(impl, cfg, state, x, y, fpt, args)
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for --compile: report, go on
                notes.append(f"{name} {impl} failed: {type(e).__name__}: {e}")
                continue
            results.append({"preset": name, "params": cfg.num_params, **r})
        ref = next((r for r in results if r["preset"] == name and r["impl"] == "transformers"), None)
        for r in results:
            if r["preset"] == name and r["impl"] != "transformers" and ref:
                r["ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
    title = (f"training step, bf16 autocast, batch {args.batch}x{args.seq}, {args.threads} threads, "
             f"median of {args.steps} steps; MFU against {args.peak_flops:.3g} FLOP/s")
    print(f"{title}\n\n{table(results)}")
    if args.plot:
        notes.append(plot(results, Path(args.plot), title))
    print("".join(f"\nNote: {n}" for n in notes))
    if args.json:
        import transformers

        env = {"torch": torch.__version__, "transformers": transformers.__version__, "nproc": os.cpu_count(),
               "loadavg": open("/proc/loadavg").read().split()[:3], "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        payload = {"environment": env, "args": vars(args), "train_defaults": {k: DEFAULTS[k] for k in ("lr", "weight_decay", "betas", "eps", "clip")},
                   "results": results, "notes": notes, "table": table(results)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"raw results written to {args.json}")
    return 1 if any("failed" in n for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())

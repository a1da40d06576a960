"""`starcoder2 compare M1 M2 ...`: models or precisions side by side on the same prompts.

    starcoder2 compare ckpt ckpt:int8 ckpt:int4 other-ckpt:bf16 --limit 20 --plot compare.png

Each M is `PATH[:VARIANT]`, VARIANT one of int8 / int4 (weight-only quantization at load) or fp32 /
bf16 / fp16 (the dtype). Each is measured in a fresh process of its own (spawned one after the
other, so no variant inherits another's memory or warm caches; `isolate=False` runs them in this
process instead), with torch's lazily imported parts imported before any timing:
- parameters: the config's count (quantized weights count as the parameters they stand for);
- memory: resident set size (RSS) after the speed runs minus RSS before the load (bf16 weights are
  mmapped lazily, so RSS right after the load, also kept, reads low); on CUDA also the peak allocated;
- load time: the `starcoder2.load` call (quantization included);
- time to first token and decode tok/s: the first `--speed-prompts` HumanEval prompts, each alone,
  greedy, exactly `--speed-tokens` new tokens (no stop), after one warm-up; medians;
- pass@1: greedy HumanEval on the first `--limit` problems, judged in the sandbox;
- FIM exact match: greedy HumanEval single-line infilling on the first `--limit` holes (needs the
  benchmarks folder: `--data`, or ../shared/data/benchmarks beside a checkout; "n/a" without it).
A Markdown table is printed; `--plot FILE` draws one bar chart per metric; `--output FILE` keeps JSON.
"""

from __future__ import annotations

import gc
import importlib
import math
import multiprocessing
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

QUANT_VARIANTS = ("int8", "int4")
DTYPE_VARIANTS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Variant:
    spec: str
    path: str
    quantize: str | None = None
    dtype: str | None = None


def parse_variant(spec: str) -> Variant:
    """`PATH[:int8|int4|fp32|bf16|fp16]`; a colon followed by anything else is part of the path."""
    path, sep, suffix = spec.rpartition(":")
    if sep and path and suffix in QUANT_VARIANTS:
        return Variant(spec, path, quantize=suffix)
    if sep and path and suffix in DTYPE_VARIANTS:
        return Variant(spec, path, dtype=suffix)
    return Variant(spec, spec)


def rss_bytes() -> int:
    """Current resident set size of this process (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def speed(lm, prompts: list[list[int]], new_tokens: int) -> dict:
    """Median time to first token and decode tok/s, each prompt alone through the Engine."""
    from ..infer.engine import Engine
    from ..infer.generate import SamplingParams

    ctx = lm.model.config.max_position_embeddings
    new_tokens = min(new_tokens, ctx // 2)
    prompts = [p[-(ctx - new_tokens - 1):] for p in prompts]
    engine = Engine(lm.model, lm.tokenizer, max_batch=1, max_seq_len=min(ctx, max(map(len, prompts)) + new_tokens + 1))
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=[])  # no stop: every run has new_tokens
    engine.generate([prompts[0]], params)  # warm-up
    ttft, rates = [], []
    for ids in prompts:
        req = engine.generate([ids], params)[0]
        ttft.append(req.t_first - req.t_submit)
        if len(req.output) > 1 and req.t_done > req.t_first:
            rates.append((len(req.output) - 1) / (req.t_done - req.t_first))
    return {"ttft_s": statistics.median(ttft), "tok_s": statistics.median(rates) if rates else float("nan")}


def measure(variant: Variant, *, limit: int, data: str | Path | None, dtype: str | None, device: str | None,
            speed_prompts: int = 3, speed_tokens: int = 64, max_new_tokens: int | None = None) -> dict:
    """Every metric of one variant; the model is dropped before returning."""
    import torch

    from ..api import load
    from .runner import EvalSettings, evaluate
    from .tasks import get_task

    importlib.import_module("torch._dynamo")  # torch imports it on the first model build: keep that out of load_s
    gc.collect()
    cuda = torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss0, t0 = rss_bytes(), time.perf_counter()
    lm = load(variant.path, dtype=variant.dtype or dtype, device=device, quantize=variant.quantize)
    row = {"model": variant.spec, "parameters": lm.config.num_params, "load_s": time.perf_counter() - t0,
           "rss_load_bytes": rss_bytes() - rss0}
    problems = get_task("humaneval").load()[:max(1, speed_prompts)]
    prompts = [lm.tokenizer.encode(get_task("humaneval").prompt(p)) for p in problems]
    row.update(speed(lm, prompts, speed_tokens))
    row["rss_bytes"] = rss_bytes() - rss0
    if cuda:
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    settings = EvalSettings(max_new_tokens=max_new_tokens, code_checks=False)
    row["pass@1"] = evaluate("humaneval", lm=lm, limit=limit, settings=settings, progress=False)["pass@1"]
    try:
        infill = get_task("infill-single-line")
        infill.data_path(data)
    except (ValueError, OSError) as e:
        row["fim_exact_match"], row["fim_note"] = None, str(e)
    else:
        fim = evaluate("infill-single-line", lm=lm, data=data, limit=limit,
                       settings=EvalSettings(max_new_tokens=max_new_tokens, code_checks=False), progress=False)
        row["fim_exact_match"] = fim["exact_match"]
    del lm
    gc.collect()
    return row


def compare(specs: list[str], isolate: bool = True, **kw) -> list[dict]:
    """One row per spec, in order (see the module docstring); keyword arguments go to `measure`."""
    if not specs:
        raise ValueError("compare needs at least one model")
    rows = []
    for spec in specs:
        if not isolate:
            rows.append(measure(parse_variant(spec), **kw))
            continue
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited threads, memory or CUDA state
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            rows.append(pool.submit(measure, parse_variant(spec), **kw).result())
    return rows


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None or math.isnan(v) else format(v, spec)


def markdown_table(rows: list[dict]) -> str:
    head = ["model", "parameters", "memory (RSS)", "load s", "TTFT ms", "decode tok/s", "HumanEval pass@1",
            "FIM exact match"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["model"], f"{r['parameters'] / 1e6:,.1f} M", f"{r['rss_bytes'] / 2**20:,.0f} MiB",
                 _fmt(r["load_s"], ".2f"), _fmt(r["ttft_s"] * 1000, ".1f"), _fmt(r["tok_s"], ".1f"),
                 _fmt(r["pass@1"], ".3f"), _fmt(r.get("fim_exact_match"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path) -> None:
    """One bar chart per metric, a bar per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("rss_bytes", "memory (MiB)", 1 / 2**20), ("load_s", "load (s)", 1.0), ("ttft_s", "TTFT (ms)", 1000.0),
               ("tok_s", "decode tok/s", 1.0), ("pass@1", "HumanEval pass@1", 1.0),
               ("fim_exact_match", "FIM exact match", 1.0)]
    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6))
    for ax, (key, title, scale) in zip(axes, metrics):
        vals = [(r.get(key) or 0.0) * scale for r in rows]
        ax.bar(range(len(rows)), vals, color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(title, fontsize=10)
        if key in ("pass@1", "fim_exact_match"):
            ax.set_ylim(0, 1)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")  # atomic; savefig picks the format by suffix
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)

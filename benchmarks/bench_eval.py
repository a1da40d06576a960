"""Evaluation throughput: the sandbox's programs per second, and a HumanEval run end to end.

1. Sandbox: HumanEval's canonical solutions as test programs (`prompt + canonical_solution + test +
   check(entry_point)`, the programs `starcoder2 eval humaneval` runs), through `sandbox.run_many`
   with N = 1, 2, 4 workers, once per isolation mode that works here (bwrap / netns / rlimits-only,
   docs/sandbox.md). Programs per second = programs / wall time of the whole batch; every program
   must pass (a failure would mean the mode is broken, and the run says so).
2. End to end: greedy HumanEval with the embedded 7.9M-parameter demo model (`starcoder2.load()`),
   the first --limit problems (all 164 by default), in the three phases `starcoder2 eval` runs one
   after the other (its judging blocks generation; nothing overlaps): generation through the Engine
   (`runner.generate`, batch --batch-size), sandboxed execution of the completions
   (`evaluate(samples=...)`, code checks off), and the code checks (`codecheck.check_many`: syntax,
   ruff, bandit, imports). Their sum is the run's wall time.

    nice -n 19 .venv/bin/python benchmarks/bench_eval.py --programs 32 --limit 8        # smoke, ~1 min
    nice -n 19 .venv/bin/python benchmarks/bench_eval.py --json docs/bench_eval.json --plot docs/bench_eval.png

Prints two tables; --json keeps every number with the machine's core count and load average, --plot
draws programs/s against workers per mode and the end-to-end phases as a stacked bar.
Left out: repeats (one pass each; the machine is shared, so the load average is recorded), HumanEval+ /
MBPP+ differential programs (each runs ~750 inputs: a different, heavier workload), GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from starcoder2.eval.runner import EvalSettings, evaluate, generate, write_json
from starcoder2.eval.sandbox import SandboxLimits, isolation_modes, run_many
from starcoder2.eval.tasks import BASE_TIMEOUT_S, check_program, get_task

WORKERS = (1, 2, 4)


def sandbox_throughput(num_programs: int, workers: tuple[int, ...], modes: list[str]) -> list[dict]:
    """Programs per second for each (isolation mode, workers), on canonical HumanEval programs."""
    problems = get_task("humaneval").load()[:num_programs]
    programs = [check_program(p["prompt"] + p["canonical_solution"], p) for p in problems]
    limits = SandboxLimits(timeout_s=BASE_TIMEOUT_S)
    rows = []
    for mode in modes:
        run_many(programs[:2], limits, workers=1, isolation=mode)  # warm-up: the mode's probe, page cache
        for n in workers:
            t0 = time.perf_counter()
            results = run_many(programs, limits, workers=n, isolation=mode)
            wall = time.perf_counter() - t0
            statuses = Counter(r.status for r in results)
            rows.append({"isolation": mode, "workers": n, "programs": len(programs), "wall_s": round(wall, 3),
                         "programs_per_s": round(len(programs) / wall, 2),
                         "mean_program_s": round(sum(r.duration_s for r in results) / len(results), 4),
                         "statuses": dict(statuses)})
            print(f"  {mode:<12} workers={n}: {rows[-1]['programs_per_s']:7.2f} programs/s {dict(statuses)}",
                  file=sys.stderr)
    return rows


def end_to_end(limit: int, batch_size: int, workers: int, max_new_tokens: int | None) -> dict:
    """Greedy HumanEval with the embedded model: generation, execution and code-check seconds."""
    import starcoder2
    from starcoder2.eval.codecheck import check_many

    task = get_task("humaneval")
    problems = task.load()[:limit]
    settings = EvalSettings(batch_size=batch_size, workers=workers, code_checks=False, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    lm = starcoder2.load()
    load_s = time.perf_counter() - t0

    stats = Counter(truncated_prompts=0, generated_tokens=0)
    t0 = time.perf_counter()
    completions = {p["task_id"]: c for p, _, c in generate(lm, task, [(p, 0) for p in problems], settings, stats)}
    generation_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as d:
        samples = Path(d, "samples.jsonl")
        samples.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in completions.items()))
        t0 = time.perf_counter()
        report = evaluate("humaneval", samples=samples, limit=limit, settings=settings, progress=False)
        execution_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    check_many([task.solution(p, completions[p["task_id"]]) for p in problems])
    checks_s = time.perf_counter() - t0
    total = generation_s + execution_s + checks_s
    return {"model": "embedded demo model (7.9M parameters, bf16, CPU)", "problems": len(problems),
            "decoding": settings.decoding(task), "batch_size": batch_size, "sandbox_workers": workers,
            "isolation": report["isolation"], "load_s": round(load_s, 2), "generation_s": round(generation_s, 2),
            "generated_tokens": stats["generated_tokens"],
            "generation_tok_s": round(stats["generated_tokens"] / generation_s, 1),
            "execution_s": round(execution_s, 2), "code_checks_s": round(checks_s, 2), "total_s": round(total, 2),
            "pass@1": report["pass@1"], "status": report["status"]["base"]}


def tables(sandbox: list[dict], e2e: dict | None) -> str:
    modes = list(dict.fromkeys(r["isolation"] for r in sandbox))
    workers = sorted({r["workers"] for r in sandbox})
    by = {(r["isolation"], r["workers"]): r for r in sandbox}
    lines = ["| isolation | " + " | ".join(f"{n} worker{'s' * (n > 1)}" for n in workers) + " |",
             "|---|" + "---|" * len(workers)]
    for m in modes:
        lines.append(f"| {m} | " + " | ".join(f"{by[m, n]['programs_per_s']:.1f}" for n in workers) + " |")
    if e2e:
        lines += ["", "| problems | generation s (tok/s) | execution s | code checks s | total s | pass@1 |",
                  "|---|---|---|---|---|---|",
                  (f"| {e2e['problems']} | {e2e['generation_s']:.1f} ({e2e['generation_tok_s']:.0f}) | "
                   f"{e2e['execution_s']:.1f} | {e2e['code_checks_s']:.1f} | {e2e['total_s']:.1f} | {e2e['pass@1']:.3f} |")]
    return "\n".join(lines)


def plot(sandbox: list[dict], e2e: dict | None, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if e2e else 1, figsize=(10 if e2e else 5, 3.8), squeeze=False)
    ax = axes[0][0]
    for m in dict.fromkeys(r["isolation"] for r in sandbox):
        rows = [r for r in sandbox if r["isolation"] == m]
        ax.plot([r["workers"] for r in rows], [r["programs_per_s"] for r in rows], marker="o", label=m)
    ax.set(xlabel="workers", ylabel="programs / s", title="sandbox: canonical HumanEval programs",
           xticks=sorted({r["workers"] for r in sandbox}))
    ax.set_ylim(bottom=0)
    ax.legend()
    if e2e:
        ax = axes[0][1]
        left = 0.0
        for key, label in (("generation_s", "generation"), ("execution_s", "execution"),
                           ("code_checks_s", "code checks")):
            ax.barh([0], [e2e[key]], left=left, label=f"{label} {e2e[key]:.0f} s")
            left += e2e[key]
        ax.set(yticks=[], xlabel="seconds",
               title=f"HumanEval end to end, {e2e['problems']} problems, embedded model")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize=8)
    fig.tight_layout()
    tmp = Path(out).with_name(f".{Path(out).name}.tmp{Path(out).suffix}")  # savefig picks the format by suffix
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--programs", type=int, default=164, help="canonical HumanEval programs per sandbox run")
    p.add_argument("--workers", type=int, nargs="+", default=list(WORKERS))
    p.add_argument("--modes", nargs="+", help="isolation modes (default: every one that works here)")
    p.add_argument("--limit", type=int, default=164, help="HumanEval problems end to end (0: skip that part)")
    p.add_argument("--batch-size", type=int, default=8, help="Engine rows for generation")
    p.add_argument("--e2e-workers", type=int, default=2, help="sandbox workers end to end")
    p.add_argument("--max-new-tokens", type=int, help="default: the task's 512")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--plot", help="write the figure here")
    args = p.parse_args(argv)

    machine = {"cpus": os.cpu_count(), "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    modes = args.modes or isolation_modes()
    print(f"sandbox: {args.programs} programs, modes {modes}, workers {args.workers}", file=sys.stderr)
    sandbox = sandbox_throughput(args.programs, tuple(args.workers), modes)
    e2e = None
    if args.limit:
        print(f"end to end: {args.limit} HumanEval problems", file=sys.stderr)
        e2e = end_to_end(args.limit, args.batch_size, args.e2e_workers, args.max_new_tokens)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(tables(sandbox, e2e))
    if args.json:
        write_json(args.json, {"machine": machine, "sandbox": sandbox, "end_to_end": e2e,
                               "command": "python benchmarks/bench_eval.py " + " ".join(argv or sys.argv[1:])})
    if args.plot:
        plot(sandbox, e2e, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

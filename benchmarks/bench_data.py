#!/usr/bin/env python
"""Data pipeline throughput (starcoder2/data/pipeline.py), per stage and end to end, in MB/s.

The corpus is one every machine has: the Python standard library (`sysconfig.get_paths()["stdlib"]`,
one repository, site-packages and friends left out by the exclude list of recipes/embedded/data.json,
whose whole config is used) and, with --site-packages, the venv's site-packages as a second one.
Each stage function runs once, in pipeline order, timed with `time.perf_counter`:

    ingest+licence  stage_ingest          read, decode, language, licences     (input: bytes read)
    dedup           stage_dedup           exact then near (MinHash LSH)         (input: ingested text)
    filter+pii      stage_clean           filters, decontamination, PII; --workers processes
    repo documents  repository_documents  group, shuffle, metadata draw
    tokenize        tokenize_repository   through the pipeline's own worker pool (as `prepare` does)
    end to end      the sum, against the bytes read

Then the pipeline's keep/drop report (`format_report`) and, on the same near-dedup input (the
exact-dedup survivors), ours beside datasketch MinHash + MinHashLSH (benchmarks/bench_dedup.py).
Without --tokenizer a 4096-entry BPE is trained on the cleaned files first (timed, not in the table).

    nice -n 19 .venv/bin/python benchmarks/bench_data.py --limit-mb 2 --workers 1     # smoke, ~1 min
    .venv/bin/python benchmarks/bench_data.py --json docs/bench_data.json --plot docs/bench_data.png
    .venv/bin/python benchmarks/bench_data.py --site-packages --tokenizer DIR

Left out: shard writing and the stage cache of `prepare` (disk, not compute), cold page cache
(the first stage reads files the OS may already hold), repeats (one pass; the machine is shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):  # the package, and bench_dedup beside this file
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_dedup import compare_with_datasketch  # noqa: E402
from starcoder2.data import pipeline  # noqa: E402
from starcoder2.data.dedup import exact_dedup  # noqa: E402
from starcoder2.data.ingest import excluded  # noqa: E402
from starcoder2.tokenizer import Tokenizer, train_bpe  # noqa: E402

RECIPE = REPO / "recipes" / "embedded" / "data.json"


def corpus_roots(site_packages: bool) -> list[Path]:
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    purelib = Path(sysconfig.get_paths()["purelib"])
    return roots + [purelib] if site_packages and purelib != roots[0] else roots


def cut_corpus(roots: list[Path], limit_bytes: int, exclude: tuple[str, ...], tmp: Path) -> list[Path]:
    """Copies of the first files (sorted walk) of each root, `limit_bytes / len(roots)` from each.

    Copies rather than links: ingest skips symlinks. Each copy keeps its root's name (the repository)."""
    def files(root: Path):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            yield from (Path(dirpath) / f for f in sorted(filenames))

    out = []
    for root in roots:
        dest, total = tmp / root.name, 0
        for src in files(root):
            rel = src.relative_to(root).as_posix()
            if excluded(rel, exclude) or src.is_symlink():
                continue
            if total >= limit_bytes / len(roots):
                break
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / rel)
            total += src.stat().st_size
        out.append(dest)
    return out


def nbytes(docs) -> int:
    return sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def run_pipeline(sources: list[Path], config: pipeline.DataConfig, tok_dir: str | None, workers: int) -> dict:
    rows, reports = [], []

    def row(stage: str, in_bytes: int, seconds: float, kept: int, dropped: int, **extra) -> None:
        rows.append({"stage": stage, "input_mb": in_bytes / 1e6, "seconds": seconds,
                     "mb_per_s": in_bytes / 1e6 / seconds if seconds else float("inf"),
                     "kept_files": kept, "dropped_files": dropped, **extra})

    def drops(report) -> tuple[int, int]:  # (files, bytes)
        return sum(n for n, _ in report.dropped.values()), sum(b for _, b in report.dropped.values())

    s, (rep, docs) = timed(pipeline.stage_ingest, [str(p) for p in sources], config)
    n_read, b_read = rep.kept_files + drops(rep)[0], rep.kept_bytes + drops(rep)[1]
    row(rep.name, b_read, s, rep.kept_files, drops(rep)[0])
    reports.append(rep)
    near_input = [d.text for d in exact_dedup(docs)[0]]  # what near dedup sees inside stage_dedup

    b_in = nbytes(docs)
    s, (rep, docs) = timed(pipeline.stage_dedup, docs, config)
    row(rep.name, b_in, s, rep.kept_files, drops(rep)[0])
    reports.append(rep)

    b_in = nbytes(docs)
    s, (rep, docs, pii) = timed(pipeline.stage_clean, docs, config, workers, False)
    row(rep.name, b_in, s, rep.kept_files, drops(rep)[0])
    reports.append(rep)

    b_in = nbytes(docs)
    s, items = timed(pipeline.repository_documents, docs, config)
    row("repo documents", b_in, s, len(docs), 0, documents=len(items))

    if tok_dir:
        tok, tok_train_s = Tokenizer.from_dir(tok_dir), None
    else:
        tok_train_s, tok = timed(lambda: train_bpe([d.text for d in docs], vocab_size=4096))
    # _pool_map/_tokenize_one are what `prepare` runs: tokenize_repository per document on every worker.
    s, arrays = timed(pipeline._pool_map, pipeline._tokenize_one, items, {"tokenizer": tok}, workers,
                      "tokenize", False)
    tokens = sum(len(a) for a in arrays)
    row("tokenize", b_in, s, len(docs), 0, tokens=tokens, bytes_per_token=b_in / max(tokens, 1))
    row("end to end", b_read, sum(r["seconds"] for r in rows), len(docs), n_read - len(docs))
    return {"rows": rows, "stages": [dataclasses.asdict(r) for r in reports], "pii_redactions": dict(pii),
            "tokenizer": tok_dir or f"trained: BPE {tok.vocab_size} entries in {tok_train_s:.1f} s",
            "near_dedup_input": near_input}


def table(rows: list[dict]) -> str:
    lines = [f"{'stage':<16}{'input MB':>10}{'seconds':>10}{'MB/s':>9}{'kept files':>12}{'dropped files':>15}"]
    for r in rows:
        lines.append(f"{r['stage']:<16}{r['input_mb']:>10.2f}{r['seconds']:>10.2f}{r['mb_per_s']:>9.2f}"
                     f"{r['kept_files']:>12}{r['dropped_files']:>15}")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed; {out} not written"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r["stage"] for r in rows], [r["mb_per_s"] for r in rows],
           color=["tab:blue"] * (len(rows) - 1) + ["tab:orange"])
    ax.set_ylabel("MB/s (input of the stage)")
    ax.set_yscale("log")
    ax.tick_params(axis="x", rotation=30)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return f"plot written to {out}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=0, help="processes for filter+pii and tokenize (0: every core)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: train a 4096-entry BPE)")
    p.add_argument("--limit-mb", type=float, help="cut the corpus to about this many MB (quick run)")
    p.add_argument("--site-packages", action="store_true", help="add the venv's site-packages as a repository")
    p.add_argument("--no-datasketch", dest="datasketch", action="store_false", help="skip the comparison")
    p.add_argument("--json", metavar="OUT", help="write the raw results here")
    p.add_argument("--plot", metavar="OUT.png", help="write a bar chart of MB/s per stage here")
    args = p.parse_args(argv)
    config = dataclasses.replace(pipeline.DataConfig.from_file(RECIPE), workers=args.workers)
    workers = config.workers or os.cpu_count() or 1
    roots = corpus_roots(args.site_packages)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        sources = cut_corpus(roots, int(args.limit_mb * 1e6), tuple(config.exclude), Path(tmp)) if args.limit_mb else roots
        r = run_pipeline(sources, config, args.tokenizer, workers)
    near_input = r.pop("near_dedup_input")
    title = (f"{' + '.join(('stdlib', 'site-packages')[:len(roots)])}{f' (first {args.limit_mb:g} MB)' if args.limit_mb else ''}"
             f", {workers} worker(s), {os.cpu_count()} CPUs")
    print(f"Data pipeline on {title}; config {RECIPE.relative_to(REPO)}; tokenizer: {r['tokenizer']}")
    print(f"corpus: {', '.join(str(x) for x in roots)}\n")
    print(table(r["rows"]))
    tok = r["rows"][-2]
    print(f"\ntokens: {tok['tokens']:,} ({tok['bytes_per_token']:.2f} bytes/token); "
          f"PII redactions: {r['pii_redactions'] or 'none'}\n")
    print(pipeline.format_report(r["stages"]))
    notes = []
    if args.datasketch:
        d = compare_with_datasketch(near_input, config.dedup)
        r["datasketch"] = d
        print(f"\nNear dedup on the exact-dedup survivors: {d['files']} files, {d['mb']:.2f} MB, "
              f"{d['eligible']} with >= {config.dedup.min_tokens} tokens; {d['bands']} bands x {d['rows']} rows")
        print(f"{'':<11}{'seconds':>9}{'MB/s':>8}{'clusters':>10}{'dropped':>9}")
        for name in ("ours", "datasketch"):
            s = d[name]
            print(f"{name:<11}{s['seconds']:>9.2f}{s['mb_per_s']:>8.2f}{s['clusters']:>10}{s['dropped']:>9}")
        print(f"ours/datasketch speed: {d['datasketch']['seconds'] / d['ours']['seconds']:.2f}x; agreement "
              f"(same keep/drop): {d['agreement']:.4f}; identical signatures: {d['identical_signatures']}/{d['eligible']}")
    if args.plot:
        notes.append(plot(r["rows"], Path(args.plot), title))
        print("\n" + notes[-1])
    if args.json:
        payload = {"corpus": title, "roots": [str(x) for x in roots], "limit_mb": args.limit_mb, "workers": workers,
                   "config": dataclasses.asdict(config), "loadavg": open("/proc/loadavg").read().split()[:3],
                   **r, "notes": notes}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=list) + "\n")
        print(f"raw results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

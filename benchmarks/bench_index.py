#!/usr/bin/env python
"""Repository index speed (starcoder2/repo/index.py): full index, no-op and one-file updates, BM25
build and search latency, per corpus.

Each corpus's listed files (what `starcoder2 index` considers: git's list inside a work tree, else
every file; "listed" in the table, "files" are those indexed) are copied to a temporary directory
first, so the one-file update can edit a file safely. Phases, timed with `time.perf_counter`, one
pass each (the machine is shared; compare rows of one run only):

    index       RepoIndex.update() on an empty database: list, read, hash, chunk (tree-sitter), tokenize
    no-op       update() again: lists the files (a directory walk outside git) and stats each
    one edit    update() after appending a function to one file: re-chunks that file only
    bm25        the first search after a change: rebuilds the BM25 matrix over every chunk (bm25s)
    search      mean latency of --queries searches (first lines of seeded random chunks), k=8

    nice -n 19 .venv/bin/python benchmarks/bench_index.py                       # this checkout + stdlib
    .venv/bin/python benchmarks/bench_index.py --json docs/bench_index.json --plot docs/bench_index.png
    .venv/bin/python benchmarks/bench_index.py --root ~/src/big-project --root .

Left out: cold page cache, embeddings (not implemented), retrieval quality (`starcoder2 eval repo`).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from starcoder2.eval.runner import write_json  # noqa: E402
from starcoder2.repo import RepoIndex  # noqa: E402

COLUMNS = ("listed", "files", "chunks", "index_s", "noop_s", "edit_s", "bm25_s", "search_ms")


def bench_root(root: Path, queries: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        with RepoIndex.open(root, db_path=Path(tmp) / "listing.sqlite") as listing:
            files = listing.listed_files()  # the same selection as `starcoder2 index`, before reading
        copy = Path(tmp) / root.name
        for rel in files:
            src = root / rel
            if src.is_file() and not src.is_symlink():
                (copy / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, copy / rel)
        with RepoIndex.open(copy, db_path=Path(tmp) / "index.sqlite") as index:
            row = {"corpus": str(root), "listed": len(files), **_phases(index, queries, seed)}
    return row


def _phases(index: RepoIndex, queries: int, seed: int) -> dict:
    t = time.perf_counter()
    stats = index.update(show_progress=False)
    index_s = time.perf_counter() - t
    chunks = index.chunks()
    texts = [c.text.split("\n", 1)[0] for c in random.Random(seed).sample(chunks, min(queries, len(chunks)))]
    t = time.perf_counter()
    index.search(texts[0], k=8)
    bm25_s = time.perf_counter() - t
    t = time.perf_counter()
    for text in texts:
        index.search(text, k=8)
    search_ms = 1000 * (time.perf_counter() - t) / len(texts)
    noop_s = index.update(show_progress=False).seconds
    edited = index.root / index.files()[len(index.files()) // 2]
    with edited.open("a", encoding="utf-8") as f:
        f.write("\n\ndef bench_index_added_function(x):\n    return x\n")
    edit = index.update(show_progress=False)
    assert edit.changed == 1 and edit.added == edit.removed == 0, edit
    return {"files": stats.files, "chunks": stats.chunks, "index_s": round(index_s, 3), "noop_s": round(noop_s, 3),
            "edit_s": round(edit.seconds, 3), "bm25_s": round(bm25_s, 3), "search_ms": round(search_ms, 2),
            "languages": stats.languages}


def table(rows: list[dict]) -> str:
    lines = ["| corpus | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {Path(r['corpus']).name} | " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = ("index_s", "noop_s", "edit_s", "bm25_s")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([p + i * width for p in range(len(phases))], [r[k] for k in phases], width,
               label=f"{Path(r['corpus']).name} ({r['files']} files, {r['chunks']} chunks)")
    ax.set_xticks([p + width * (len(rows) - 1) / 2 for p in range(len(phases))], ["index", "no-op", "one edit", "bm25"])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.set_title("starcoder2 index: time per phase")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", action="append", help="corpus directory (repeatable; default: this checkout, stdlib)")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write the rows here")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart here")
    args = p.parse_args(argv)
    roots = [Path(r) for r in args.root] if args.root else [REPO, Path(sysconfig.get_paths()["stdlib"])]
    rows = [bench_root(r.resolve(), args.queries, args.seed) for r in roots]
    print(table(rows))
    if args.json:
        write_json(args.json, rows)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Near dedup benchmark: ours (starcoder2/data/dedup.py) vs datasketch MinHash + MinHashLSH on the .py
files of the Python standard library (site-packages excluded).

Both sides see the same files, the same min_tokens rule, seed, scheme and bands x rows, and keep the
lowest index of each connected component (every file has the same rank, so rank_key's path tie-break
is the input order). The datasketch side tokenizes with the plain `re.split(r"\\W+")` spec, the way a
datasketch user would, so its time includes that. With equal parameters the two should agree on every
file; "identical signatures" checks that bit for bit.

    nice -n 19 .venv/bin/python benchmarks/bench_dedup.py [--limit N] [--scheme legacy]
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from starcoder2.data.dedup import DedupConfig, minhash_signatures, near_dedup, near_duplicate_clusters  # noqa: E402
from starcoder2.data.document import Document  # noqa: E402


def stdlib_texts(limit: int | None = None) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    return [p.read_bytes().decode("utf-8", "replace") for p in paths[:limit]]


def _datasketch_dedup(texts: list[str], config: DedupConfig) -> tuple[set[int], int, dict[int, np.ndarray]]:
    """(dropped indices, number of clusters, signatures) with datasketch doing the MinHash and the LSH."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=config.num_perm, params=(config.bands, config.rows))
    minhashes = {}
    for i, text in enumerate(texts):
        tokens = [t for t in re.split(r"\W+", text.lower()) if t]
        if len(tokens) < max(config.min_tokens, config.ngram):
            continue
        shingles = {" ".join(tokens[j:j + config.ngram]).encode("utf-8", "surrogatepass")
                    for j in range(len(tokens) - config.ngram + 1)}
        m = MinHash(num_perm=config.num_perm, seed=config.seed, scheme=config.scheme)
        m.update_batch(shingles)
        lsh.insert(i, m)
        minhashes[i] = m
    parent = {i: i for i in minhashes}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, m in minhashes.items():
        for j in lsh.query(m):
            a, b = find(i), find(j)
            parent[max(a, b)] = min(a, b)
    roots = {i: find(i) for i in minhashes}
    dropped = {i for i, r in roots.items() if r != i}
    clusters = len({roots[i] for i in dropped})
    return dropped, clusters, {i: m.hashvalues for i, m in minhashes.items()}


def compare_with_datasketch(texts: list[str], config: DedupConfig) -> dict:
    """Run both near dedups on `texts`; return sizes, timings, clusters, drops and their agreement."""
    docs = [Document(text=t, repo="bench", path=f"{i:07d}") for i, t in enumerate(texts)]
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6

    t0 = time.perf_counter()
    _, dropped = near_dedup(docs, config)
    ours_s = time.perf_counter() - t0
    ours_drop = {int(d.path) for d, _ in dropped}
    ours_clusters = len(near_duplicate_clusters(docs, config))  # untimed second pass, for the count

    t0 = time.perf_counter()
    ds_drop, ds_clusters, ds_sigs = _datasketch_dedup(texts, config)
    ds_s = time.perf_counter() - t0

    sigs = minhash_signatures([texts[i] for i in ds_sigs], config)
    same_sigs = sum(np.array_equal(s, d) for s, d in zip(sigs, ds_sigs.values()))
    agree = sum((i in ours_drop) == (i in ds_drop) for i in range(len(texts)))
    return {"files": len(texts), "mb": mb, "eligible": len(ds_sigs), "bands": config.bands, "rows": config.rows,
            "ours": {"seconds": ours_s, "mb_per_s": mb / ours_s, "clusters": ours_clusters, "dropped": len(ours_drop)},
            "datasketch": {"seconds": ds_s, "mb_per_s": mb / ds_s, "clusters": ds_clusters, "dropped": len(ds_drop)},
            "agreement": agree / len(texts), "identical_signatures": same_sigs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, help="only the first N files (sorted by path)")
    p.add_argument("--scheme", default="affine32", choices=("affine32", "legacy"))
    p.add_argument("--num-perm", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.7)
    args = p.parse_args(argv)
    config = DedupConfig(num_perm=args.num_perm, threshold=args.threshold, scheme=args.scheme)
    r = compare_with_datasketch(stdlib_texts(args.limit), config)
    print(f"stdlib: {r['files']} files, {r['mb']:.1f} MB, {r['eligible']} with >= {config.min_tokens} tokens; "
          f"num_perm={config.num_perm}, {r['bands']} bands x {r['rows']} rows, scheme={config.scheme}")
    print(f"{'':<11}{'files':>7}{'MB':>7}{'seconds':>9}{'MB/s':>7}{'clusters':>10}{'dropped':>9}")
    for name in ("ours", "datasketch"):
        s = r[name]
        print(f"{name:<11}{r['files']:>7}{r['mb']:>7.1f}{s['seconds']:>9.2f}{s['mb_per_s']:>7.2f}"
              f"{s['clusters']:>10}{s['dropped']:>9}")
    print(f"agreement (same keep/drop): {r['agreement']:.4f}; identical signatures: "
          f"{r['identical_signatures']}/{r['eligible']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Exact and near dedup: parity with datasketch (LSH parameters, signatures, band collisions) and the
keeper / scope / short-file rules of data-pipeline.md §3.4-3.5."""

from __future__ import annotations

import csv
import heapq
import inspect
import json.decoder
import json.encoder
import random
import re
import string
import textwrap

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH
from datasketch.hashfunc import sha1_hash32

from starcoder2.data.dedup import (DedupConfig, exact_dedup, jaccard, minhash_signatures, near_dedup,
                                   near_duplicate_clusters, optimal_param, rank_key, shingles)
from starcoder2.data.document import Document

MODULES = [json.decoder, json.encoder, csv, heapq, random, string, textwrap, inspect, re, pytest]
UNICODE = "Ünïcode wörds: straße ΑΒΓ δέλτα — KELVIN \u212a ok, 名前 = 値 * 2 # ½ x² done again and again"


def _source(module) -> str:
    return inspect.getsource(module)


def _mutate(text: str, fraction: float, seed: int) -> str:
    """Replace `fraction` of the lines with new code: a near-duplicate whose similarity falls with fraction."""
    rng = random.Random(seed)
    lines = text.splitlines()
    for i in rng.sample(range(len(lines)), int(fraction * len(lines))):
        lines[i] = f"value_{rng.randrange(10**6)} = compute_{rng.randrange(10**6)}(arg_{i})"
    return "\n".join(lines)


def _doc(text: str, path: str, repo: str = "r", licence_type: str = "permissive", stars: int = 0,
         forks: int = 0, language: str | None = "Python") -> Document:
    return Document(text=text, repo=repo, path=path, language=language, licence_type=licence_type,
                    meta={"stars": stars, "forks": forks})


@pytest.mark.parametrize("threshold,num_perm", [(0.7, 256), (0.7, 250), (0.5, 128), (0.85, 128), (0.3, 64)])
def test_optimal_param_matches_datasketch(threshold, num_perm):
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    assert optimal_param(threshold, num_perm) == (lsh.b, lsh.r)


def test_default_config_is_stack_v2_banding():
    config = DedupConfig()
    assert (config.bands, config.rows) == (25, 10)  # data-pipeline.md §3.5
    assert (DedupConfig(bands=16, rows=16).bands, DedupConfig(bands=16, rows=16).rows) == (16, 16)
    for bad in ({"bands": 4}, {"bands": 30, "rows": 10}, {"threshold": 1.0}, {"scheme": "mod-prime"}):
        with pytest.raises(ValueError):
            DedupConfig(**bad)


def test_shingles_follow_the_spec():
    for text in [_source(textwrap), UNICODE, "", "a b", "x\u00a0y"]:
        tokens = [t for t in re.split(r"\W+", text.lower()) if t]
        expected = {" ".join(tokens[i:i + 5]).encode("utf-8") for i in range(len(tokens) - 4)}
        assert shingles(text) == expected


@pytest.mark.parametrize("scheme,seed", [("affine32", 1), ("affine32", 42), ("legacy", 1), ("legacy", 7)])
def test_signatures_equal_datasketch(scheme, seed):
    texts = [_source(m) for m in MODULES[:5]] + [UNICODE, "too short", ""]
    config = DedupConfig(num_perm=128, seed=seed, scheme=scheme)
    sigs = minhash_signatures(texts, config)
    assert sigs.shape == (len(texts), 128) and sigs.dtype == np.uint32
    for text, sig in zip(texts, sigs):
        m = MinHash(num_perm=128, seed=seed, hashfunc=sha1_hash32, scheme=scheme)
        m.update_batch(sorted(shingles(text)))
        np.testing.assert_array_equal(sig, m.hashvalues)
    assert (sigs[-1] == 0xFFFFFFFF).all()  # empty set: datasketch's initial value


def test_jaccard():
    text = _source(csv)
    assert jaccard(text, text) == 1.0
    assert jaccard("a b c d e f", "a b c d e g") == pytest.approx(1 / 3)  # {abcde, bcdef} vs {abcde, bcdeg}
    assert jaccard(text, _source(heapq)) < 0.1


def test_rank_key_order():
    docs = [_doc("x", "a", licence_type="non_permissive", stars=10**6),
            _doc("x", "b", licence_type="no_license"),
            _doc("x", "c", stars=1),
            _doc("x", "d", stars=5),
            _doc("x", "e", stars=5, forks=3),
            _doc("x", "a", repo="q", stars=5, forks=3)]
    assert [d.path for d in sorted(docs, key=rank_key)] == ["a", "e", "d", "c", "b", "a"]
    assert sorted(docs, key=rank_key)[0].repo == "q"  # (repo, path) breaks the last ties


def test_exact_dedup_keeps_best_ranked_copy():
    text = _source(heapq)
    docs = [_doc(text, "1.py", licence_type="non_permissive", stars=900),
            _doc(_source(csv), "other.py"),
            _doc(text, "2.py", stars=3),
            _doc(text, "3.py", stars=50),
            _doc(text, "4.py", licence_type="no_license", stars=10**4)]
    kept, dropped = exact_dedup(docs)
    assert [d.path for d in kept] == ["other.py", "3.py"]
    assert [(d.path, why) for d, why in dropped] == [(p, "exact_duplicate") for p in ("1.py", "2.py", "4.py")]
    assert [d.path for d in exact_dedup(docs[::-1])[0]] == ["3.py", "other.py"]


def test_planted_near_duplicates_keep_best_copy():
    base = _source(json.decoder)
    variants = [_mutate(base, 0.03, seed) for seed in range(3)]
    assert all(jaccard(base, v) > 0.85 for v in variants)
    docs = [_doc(base, "a.py", licence_type="non_permissive", stars=10**5),
            _doc(variants[0], "b.py", stars=10),
            _doc(variants[1], "c.py", stars=500),
            _doc(variants[2], "d.py", licence_type="no_license", stars=10**4)]
    docs += [_doc(_source(m), f"{m.__name__}.py") for m in MODULES[1:]]
    kept, dropped = near_dedup(docs, DedupConfig())
    assert {d.path for d, _ in dropped} == {"a.py", "b.py", "d.py"}
    assert {why for _, why in dropped} == {"near_duplicate"}
    assert len(kept) == 1 + len(MODULES) - 1 and "c.py" in {d.path for d in kept}
    assert [[docs[i].path for i in c] for c in near_duplicate_clusters(docs)] == [["c.py", "b.py", "d.py", "a.py"]]


def test_distinct_files_are_all_kept():
    docs = [_doc(_source(m), f"{m.__name__}.py") for m in MODULES]
    kept, dropped = near_dedup(docs)
    assert dropped == [] and kept == docs


def test_short_files_are_never_near_deduplicated():
    short = ["pass", "x = 1", "import os", "a = b + c", "pass"]  # < 5 tokens; the duplicate is exact dedup's job
    docs = [_doc(t, f"{i}.py") for i, t in enumerate(short)]
    assert near_dedup(docs)[1] == []
    assert [d.path for d, _ in exact_dedup(docs)[1]] == ["4.py"]
    five = [_doc("a = b + c + d + e", "x.py"), _doc("A = b + c + d + E", "y.py")]  # 5 tokens, equal after lowercasing
    assert [d.path for d, _ in near_dedup(five)[1]] == ["y.py"]
    assert near_dedup(five, DedupConfig(min_tokens=6))[1] == []


def test_per_language_scope():
    text = _source(string)
    docs = [_doc(text, "a.py", language="Python"), _doc(text, "A.java", language="Java", stars=9)]
    assert near_dedup(docs)[1] == []  # Stack v2: cross-language copies survive
    assert [d.path for d, _ in near_dedup(docs, DedupConfig(per_language=False))[1]] == ["a.py"]


def test_lsh_links_the_pairs_datasketch_finds():
    """Similarities spread around the threshold: our band collisions are exactly datasketch's LSH candidates."""
    config = DedupConfig(num_perm=128, threshold=0.6)
    texts, base = [], [_source(m) for m in MODULES[:4]]
    for k, text in enumerate(base):
        texts += [text] + [_mutate(text, f, 10 * k + j) for j, f in enumerate((0.05, 0.15, 0.25, 0.35, 0.5))]
    docs = [_doc(t, f"{i:03d}.py") for i, t in enumerate(texts)]
    lsh = MinHashLSH(num_perm=config.num_perm, params=(config.bands, config.rows))
    minhashes = []
    for i, t in enumerate(texts):
        m = MinHash(num_perm=config.num_perm, seed=config.seed)
        m.update_batch(shingles(t))
        lsh.insert(i, m)
        minhashes.append(m)
    linked = {i for i, m in enumerate(minhashes) if len(lsh.query(m)) > 1}
    ours = {i for c in near_duplicate_clusters(docs, config) for i in c}
    assert ours == linked and 0 < len(ours) < len(texts)


def test_deterministic_and_order_independent():
    base = _source(textwrap)
    docs = [_doc(base, "a.py", stars=1), _doc(_mutate(base, 0.02, 0), "b.py", stars=1), _doc(_source(csv), "c.py")]
    first = near_dedup(docs)
    assert near_dedup(docs) == first
    assert {d.path for d in near_dedup(docs[::-1])[0]} == {d.path for d in first[0]} == {"a.py", "c.py"}


def test_legacy_arithmetic_matches_python_integers():
    """datasketch's legacy step ((a*h + b) mod 2^64) % (2^61 - 1) & 0xFFFFFFFF, incl. the x == p edge."""
    from starcoder2.data.dedup import _minhash

    p, rng = (1 << 61) - 1, np.random.RandomState(0)
    a = np.array([1, 1, *rng.randint(1, p, 62, dtype=np.uint64).tolist()], dtype=np.uint64)
    b = np.array([p - 5, p - 4, *rng.randint(0, p, 62, dtype=np.uint64).tolist()], dtype=np.uint64)
    hv = np.array([5, *rng.randint(0, 1 << 32, 999, dtype=np.uint32).tolist()], dtype=np.uint32)
    expected = [min(((int(ai) * int(h) + int(bi)) % 2**64 % p) & 0xFFFFFFFF for h in hv) for ai, bi in zip(a, b)]
    assert expected[0] == 0
    np.testing.assert_array_equal(_minhash(hv, a, b, "legacy"), expected)

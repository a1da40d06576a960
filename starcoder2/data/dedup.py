"""Exact and near deduplication of source files, as BigCode built The Stack v2 (data-pipeline.md §3.4-3.5).

    kept, dropped = exact_dedup(docs)            # same sha1: keep the best-ranked copy
    kept, more = near_dedup(kept, DedupConfig())  # MinHash + LSH + connected components, per language
    near_duplicate_clusters(docs, config)         # the clusters themselves (indices, keeper first)

Near dedup: tokens are the lowercased text split on Unicode `\\W+`; shingles are the set of word
5-grams joined by spaces; each shingle is hashed to 32 bits with sha1's first 4 bytes read little-
endian (BigCode v1's hash and datasketch's default `sha1_hash32`; Stack v2 used xxh32, which is not
installed here). Signatures use datasketch 2.0's permutation schemes bit for bit, so that
`minhash_signatures` equals `datasketch.MinHash(num_perm, seed, scheme=...)` fed the same shingles:
"affine32" (default; datasketch >= 2.0: fmix32 pre-mix, then `a*h + b mod 2^32` with odd `a`, a bijection)
or "legacy" (datasketch < 2.0 and BigCode v1: `(a*h + b) mod (2^61 - 1)`, masked to 32 bits). LSH cuts
the signature into `bands` x `rows` (datasketch's `optimal_param` unless given); files sharing any band
within a language are linked, linked files form clusters, and each cluster keeps its best file by
`rank_key` (permissive licence, stars, forks, then repo/path) instead of an arbitrary member.

Short files: a file with fewer than `min_tokens` word tokens (or fewer than `ngram`, so no shingle) is
never near-deduplicated, only exact-deduplicated. BigCode v2 instead gave such files an all-max
signature, so they all collided into one cluster and all but one were dropped (§5): an accident, not a
rule. Left out: the newest-revision / newest-visit tie-breaks (Document has no such fields), Stack v2's
mod 2^32-5 permutations and xxh32, and any distributed execution: everything runs in one process
(~5-6 MB/s on CPython stdlib sources, of which per-shingle sha1 is about half; benchmarks/bench_dedup.py).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .document import Document

LICENCE_ORDER = {"permissive": 0, "no_license": 1, "non_permissive": 2}
SCHEMES = ("affine32", "legacy")
_WORD = re.compile(r"\w+")  # findall(\w+) == split(\W+) without the empty strings
_ASCII_WORD = re.compile(rb"\w+")  # bytes \w is ASCII-only: the same tokens on ASCII text
_MERSENNE = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)
_CHUNK = 8192  # shingles per (chunk, num_perm) block: bounds memory on huge files


def optimal_param(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive / false-negative areas under the LSH S-curve
    `1 - (1 - s^r)^b`, searched over b*r <= num_perm exactly as datasketch's `_optimal_param`. The
    integrand is a polynomial of degree <= num_perm, so Gauss-Legendre with num_perm//2 + 1 nodes is exact
    (datasketch uses scipy's adaptive quad, accurate to ~1e-8)."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=float)
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 1)  # nodes and weights on [-1, 1]

    def area(lo: float, hi: float, false_negative: bool) -> np.ndarray:  # -> (P,)
        s = (hi - lo) / 2 * x + (hi + lo) / 2  # (n,) nodes on [lo, hi]
        p = 1 - (1 - s[None, :] ** pairs[:, 1:2]) ** pairs[:, 0:1]  # (P, n) candidate probability
        return ((1 - p) if false_negative else p) @ w * (hi - lo) / 2

    error = fp_weight * area(0.0, threshold, False) + fn_weight * area(threshold, 1.0, True)
    b, r = pairs[int(np.argmin(error))]  # argmin keeps the first minimum, like datasketch's strict `<`
    return int(b), int(r)


@dataclass(frozen=True, kw_only=True)
class DedupConfig:
    num_perm: int = 256
    ngram: int = 5
    threshold: float = 0.7
    bands: int | None = None  # None: optimal_param(threshold, num_perm)
    rows: int | None = None
    seed: int = 1  # datasketch's default seed
    scheme: str = "affine32"  # "affine32" (datasketch >= 2.0) | "legacy" (datasketch < 2.0, BigCode v1)
    min_tokens: int = 5  # fewer word tokens: exact dedup only (see the module docstring)
    per_language: bool = True  # Stack v2 deduplicated within a language; cross-language copies survive

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold={self.threshold} must lie in (0, 1)")
        if self.num_perm < 1 or self.ngram < 1:
            raise ValueError(f"num_perm={self.num_perm} and ngram={self.ngram} must be positive")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r} is not one of {SCHEMES}")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give both bands and rows, or neither")
        if self.bands is None:
            bands, rows = optimal_param(self.threshold, self.num_perm)
            object.__setattr__(self, "bands", bands)
            object.__setattr__(self, "rows", rows)
        if self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands={self.bands} x rows={self.rows} must be positive and fit num_perm={self.num_perm}")


def rank_key(doc: Document) -> tuple:
    """Keeper order, smallest first: permissive < no_license < non_permissive (unknown last), stars desc,
    forks desc, then (repo, path) so that the choice never depends on input order."""
    meta = doc.meta
    return (LICENCE_ORDER.get(doc.licence_type, len(LICENCE_ORDER)), -int(meta.get("stars") or 0),
            -int(meta.get("forks") or 0), doc.repo, doc.path)


def exact_dedup(docs: list[Document]) -> tuple[list[Document], list[tuple[Document, str]]]:
    """Keep the best-ranked copy of each distinct content (key: sha1 of the text); both lists in input order."""
    best: dict[str, int] = {}
    for i, doc in enumerate(docs):
        j = best.setdefault(doc.sha1, i)
        if j != i and rank_key(doc) < rank_key(docs[j]):
            best[doc.sha1] = i
    keep = set(best.values())
    kept = [d for i, d in enumerate(docs) if i in keep]
    return kept, [(d, "exact_duplicate") for i, d in enumerate(docs) if i not in keep]


def _tokens(text: str) -> list[bytes]:
    text = text.lower()
    if text.isascii():  # ~30% faster, and the tokens are already bytes
        return _ASCII_WORD.findall(text.encode("ascii"))
    return [t.encode("utf-8", "surrogatepass") for t in _WORD.findall(text)]


def _shingles(tokens: list[bytes], ngram: int) -> set[bytes]:
    return set(map(b" ".join, zip(*(tokens[i:] for i in range(ngram)))))


def shingles(text: str, ngram: int = 5) -> set[bytes]:
    """The de-duplicated word n-grams of `text`, UTF-8 encoded: what a MinHash signature summarises."""
    return _shingles(_tokens(text), ngram)


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of the shingle sets; two texts without shingles count as identical (1.0)."""
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def _hash32(shingle_set: set[bytes]) -> np.ndarray:  # -> (S,) uint32
    sha1 = hashlib.sha1
    return np.frombuffer(b"".join([sha1(s).digest()[:4] for s in shingle_set]), dtype="<u4").astype(np.uint32)


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (num_perm,), drawn from RandomState(seed) in datasketch's exact order."""
    gen = np.random.RandomState(seed)
    if scheme == "legacy":  # one (a, b) pair per permutation, interleaved draws
        ab = [(gen.randint(1, _MERSENNE, dtype=np.uint64), gen.randint(0, _MERSENNE, dtype=np.uint64))
              for _ in range(num_perm)]
        a, b = np.array(ab, dtype=np.uint64).T
        return a, b
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)  # odd: bijective
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix); uint32 products wrap, i.e. mod 2^32."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _minhash(hv: np.ndarray, a: np.ndarray, b: np.ndarray, scheme: str) -> np.ndarray:  # hv: (S,) -> (num_perm,)
    sig = np.full(len(a), 0xFFFFFFFF, dtype=np.uint32)  # the empty set's signature, as datasketch's
    hv = _fmix32(hv) if scheme == "affine32" else hv.astype(np.uint64)
    for lo in range(0, len(hv), _CHUNK):
        h = hv[lo:lo + _CHUNK, None]  # (S', 1)
        if scheme == "affine32":
            phv = h * a + b  # (S', num_perm) uint32
        else:  # datasketch's ((a*h + b) % p) & MASK32, where a*h + b wraps mod 2^64 in numpy uint64
            x = h * a + b  # (S', num_perm) uint64
            phv = (x & _MERSENNE) + (x >> np.uint64(61))  # == x (mod p) as 2^61 == 1 (mod p), and <= p + 7
            phv[phv >= _MERSENNE] -= _MERSENNE  # 2-3x faster than a uint64 division
            phv &= _MASK32
        np.minimum(sig, phv.min(axis=0), out=sig, casting="unsafe")
    return sig


def _signatures(shingle_sets: list[set[bytes]], config: DedupConfig) -> np.ndarray:  # -> (N, num_perm) uint32
    a, b = _permutations(config.num_perm, config.seed, config.scheme)
    sigs = np.empty((len(shingle_sets), config.num_perm), dtype=np.uint32)
    for i, s in enumerate(shingle_sets):
        sigs[i] = _minhash(_hash32(s), a, b, config.scheme)
    return sigs


def minhash_signatures(texts: list[str], config: DedupConfig) -> np.ndarray:
    """(N, num_perm) uint32 MinHash signatures of the texts' shingle sets (all 0xFFFFFFFF when empty)."""
    return _signatures([shingles(t, config.ngram) for t in texts], config)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


def near_duplicate_clusters(docs: list[Document], config: DedupConfig | None = None) -> list[list[int]]:
    """Indices into `docs` of each near-duplicate cluster (2+ files), best-ranked file first; clusters in
    the input order of their first file. Files sharing any LSH band (within a language) are linked."""
    config = config or DedupConfig()
    tokens = [_tokens(d.text) for d in docs]
    idx = [i for i, t in enumerate(tokens) if len(t) >= max(config.min_tokens, config.ngram)]  # eligible files
    sigs = _signatures([_shingles(tokens[i], config.ngram) for i in idx], config)  # (E, num_perm)
    languages: dict[str | None, int] = {}
    group = np.array([languages.setdefault(docs[i].language if config.per_language else None, len(languages))
                      for i in idx], dtype=np.uint32)  # (E,) the dedup scope of each file

    parent = list(range(len(idx)))  # union-find over eligible files
    for band in range(config.bands):
        lo = band * config.rows
        keys = np.concatenate([group[:, None], sigs[:, lo:lo + config.rows]], axis=1)  # (E, 1 + rows) bucket key
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        rep = first[inverse.reshape(-1)]  # (E,) first file of each file's bucket
        for e in np.flatnonzero(rep != np.arange(len(idx))).tolist():
            ra, rb = _find(parent, e), _find(parent, int(rep[e]))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

    members: dict[int, list[int]] = {}
    for e, i in enumerate(idx):
        members.setdefault(_find(parent, e), []).append(i)
    return [sorted(c, key=lambda i: (rank_key(docs[i]), i)) for c in members.values() if len(c) > 1]


def near_dedup(docs: list[Document], config: DedupConfig | None = None) -> tuple[list[Document], list[tuple[Document, str]]]:
    """MinHash-LSH near dedup: keep the best-ranked file of each cluster; both lists in input order."""
    drop = {i for cluster in near_duplicate_clusters(docs, config) for i in cluster[1:]}
    kept = [d for i, d in enumerate(docs) if i not in drop]
    return kept, [(d, "near_duplicate") for i, d in enumerate(docs) if i in drop]

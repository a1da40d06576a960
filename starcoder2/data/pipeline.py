"""`starcoder2 data prepare`: sources -> kept documents -> repository documents -> token shards.

Stage order follows BigCode (reference §1): ingest and licences per repository, exact then near
dedup over everything, then per-file quality filters, decontamination and PII redaction, then
repository formatting and tokenization. Every stage is a pure function over documents; this module
only chains them, runs the per-file work on every core, counts what each stage kept and dropped,
and caches each finished stage under `OUT/work/` keyed by its configuration, so an interrupted or
repeated run redoes only what is missing or changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer
from .decontam import Decontaminator, decontaminate, default_benchmark_paths, load_benchmark_strings
from .dedup import DedupConfig, exact_dedup, near_dedup
from .document import Document
from .filters import FilterConfig, quality_filters
from .ingest import read_sources
from .licence import assign_licences, is_licence_file, keep_licence
from .pii import PIIConfig, redact_document
from .shards import ShardWriter, token_dtype


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    seed: int = 0
    exclude: tuple[str, ...] = ()  # globs of paths (or directory names) to skip while reading sources
    near_dedup: bool = True
    decontaminate: bool = True
    benchmarks: str | None = None  # directory of benchmark JSONL files; None: the default places
    metadata_rate: float = 0.5  # repository documents with `<repo_name>` and file paths (reference §3.10)
    max_document_chars: int | None = None  # cut larger repositories into several documents (None: never)
    holdout: float = 0.0  # fraction of files (by a hash of repo and path) written to the "valid" split
    valid_paths: tuple[str, ...] = ()  # repository-relative paths also written to it (finetune: eval repo's)
    shard_tokens: int = 1 << 27  # tokens per shard file
    workers: int = 0  # processes for per-file stages; 0: every core

    @classmethod
    def from_dict(cls, raw: dict) -> DataConfig:
        nested = {"filters": FilterConfig, "dedup": DedupConfig, "pii": PIIConfig}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"unknown data config keys: {', '.join(sorted(unknown))}")
        kwargs = {k: nested[k](**v) if k in nested else v for k, v in raw.items()}
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> DataConfig:
        path = Path(path)
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(path.read_text())
        else:
            raw = json.loads(path.read_text())
        return cls.from_dict(raw)


# ---- the report: what each stage kept and dropped, and why ---------------------------------------


@dataclass
class StageReport:
    name: str
    kept_files: int = 0
    kept_bytes: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)  # reason -> [files, bytes]
    counts: dict[str, int] = field(default_factory=dict)  # stage-specific tallies (PII redactions by kind)

    def drop(self, reason: str, nbytes: int) -> None:
        entry = self.dropped.setdefault(reason, [0, 0])
        entry[0] += 1
        entry[1] += nbytes

    def keep(self, docs: Iterable[Document]) -> None:
        for d in docs:
            self.kept_files += 1
            self.kept_bytes += _nbytes(d)


def _nbytes(doc: Document) -> int:
    return len(doc.text.encode("utf-8", "surrogatepass"))


def format_report(stages: list[dict]) -> str:
    lines = [f"{'stage':<14} {'kept files':>10} {'kept MB':>9}  dropped (files, MB)"]
    for s in stages:
        dropped = ", ".join(f"{r} {n} ({b / 1e6:.2f})" for r, (n, b) in sorted(s["dropped"].items()))
        lines.append(f"{s['name']:<14} {s['kept_files']:>10} {s['kept_bytes'] / 1e6:>9.2f}  {dropped or '-'}")
    return "\n".join(lines)


# ---- stage cache ---------------------------------------------------------------------------------


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_jsonable).encode()).hexdigest()[:16]


def _save_stage(path: Path, key: str, report: StageReport, docs: list[Document]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"key": key, "report": dataclasses.asdict(report)}) + "\n")
        for d in docs:
            f.write(json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _load_stage(path: Path, key: str) -> tuple[StageReport, list[Document]] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        header = json.loads(f.readline())
        if header.get("key") != key:
            return None
        docs = [Document(**json.loads(line)) for line in f]
    return StageReport(**header["report"]), docs


# ---- stages --------------------------------------------------------------------------------------


def stage_ingest(sources: list[str | Path], config: DataConfig) -> tuple[StageReport, list[Document]]:
    """Read every repository, assign licences, keep permissive and unlicensed code files."""
    report, kept = StageReport("ingest+licence"), []
    for repo in read_sources(sources, config.filters.max_bytes, tuple(config.exclude)):
        for _, reason, size in repo.dropped:
            report.drop(reason, size)
        for doc in assign_licences(repo.docs):
            if is_licence_file(doc.path):  # read for detection, not trained on
                report.drop("licence_file", _nbytes(doc))
            elif reason := keep_licence(doc):
                report.drop(reason, _nbytes(doc))
            else:
                kept.append(doc)
    report.keep(kept)
    return report, kept


def stage_dedup(docs: list[Document], config: DataConfig) -> tuple[StageReport, list[Document]]:
    report = StageReport("dedup")
    kept, dropped = exact_dedup(docs)
    if config.near_dedup:
        kept, near = near_dedup(kept, config.dedup)
        dropped = dropped + near
    for doc, reason in dropped:
        report.drop(reason, _nbytes(doc))
    kept.sort(key=lambda d: (d.repo, d.path))
    report.keep(kept)
    return report, kept


_WORKER: dict = {}  # per-process state of pool workers (the decontaminator, the tokenizer)


def _init_worker(state: dict) -> None:
    _WORKER.update(state)


def _clean_one(doc: Document) -> tuple[Document | None, str | None, dict]:
    config: DataConfig = _WORKER["config"]
    if reason := quality_filters(doc, config.filters):
        return None, reason, {}
    if _WORKER.get("decontaminator") and (reason := decontaminate(doc, _WORKER["decontaminator"])):
        return None, reason, {}
    doc, counts = redact_document(doc, config.pii)
    return doc, None, counts


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _pool_map(fn: Callable, items: list, state: dict, workers: int, desc: str, progress: bool) -> list:
    """`[fn(x) for x in items]` over `workers` processes, order kept, with a progress bar."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="file", disable=not progress, dynamic_ncols=True)
    if workers <= 1 or len(items) < 64:
        _init_worker(state)
        out = []
        for x in items:
            out.append(fn(x))
            bar.update()
        bar.close()
        return out
    chunk = max(16, len(items) // (workers * 16))
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(state,)) as pool:
        out = []
        futures = [pool.submit(_map_chunk, fn, items[r.start : r.stop]) for r in _chunks(len(items), chunk)]
        for fut in futures:
            part = fut.result()
            out += part
            bar.update(len(part))
    bar.close()
    return out


def _map_chunk(fn: Callable, items: list) -> list:
    return [fn(x) for x in items]


def clean_outcomes(docs: list[Document], config: DataConfig, workers: int, progress: bool
                   ) -> list[tuple[Document | None, str | None, dict]]:
    """Per file, in input order: (redacted document, None, PII counts) if kept, else (None, reason, {}).
    stage_clean tallies these; scaleout.py runs them per partition and tallies in the same order."""
    state: dict = {"config": config}
    if config.decontaminate:
        paths = default_benchmark_paths(Path(config.benchmarks) if config.benchmarks else None)
        strings = load_benchmark_strings(paths)
        state["decontaminator"] = Decontaminator(strings) if strings else None
    return _pool_map(_clean_one, docs, state, workers, "clean", progress)


def stage_clean(docs: list[Document], config: DataConfig, workers: int, progress: bool
                ) -> tuple[StageReport, list[Document], Counter]:
    """Quality filters, decontamination, PII redaction; every core, input order kept."""
    report, kept, pii = StageReport("filter+pii"), [], Counter()
    for doc, (new, reason, counts) in zip(docs, clean_outcomes(docs, config, workers, progress)):
        if new is None:
            report.drop(reason, _nbytes(doc))
        else:
            kept.append(new)
            pii.update(counts)
    report.keep(kept)
    report.counts = dict(pii)
    return report, kept, pii


def is_holdout(doc: Document, config: DataConfig) -> bool:
    if doc.path in config.valid_paths:
        return True
    h = zlib.crc32(f"{config.seed}:{doc.repo}:{doc.path}".encode()) / 2**32
    return h < config.holdout


def repository_documents(docs: list[Document], config: DataConfig) -> list[tuple[str, bool, list[Document]]]:
    """Group files by repository, shuffle them (seeded per repository) and decide metadata.

    Returns (repo, with_metadata, files) per training document; a repository longer than
    `max_document_chars` is cut at file boundaries into several documents, each with its own draw.
    """
    by_repo: dict[str, list[Document]] = defaultdict(list)
    for d in docs:
        by_repo[d.repo].append(d)
    out = []
    for repo in sorted(by_repo):
        rng = np.random.default_rng([config.seed, zlib.crc32(repo.encode())])
        files = [by_repo[repo][i] for i in rng.permutation(len(by_repo[repo]))]
        groups, size = [[]], 0
        for f in files:
            if config.max_document_chars and groups[-1] and size + len(f.text) > config.max_document_chars:
                groups.append([])
                size = 0
            groups[-1].append(f)
            size += len(f.text)
        out += [(repo, bool(rng.random() < config.metadata_rate), g) for g in groups]
    return out


def tokenize_repository(tok: Tokenizer, repo: str, with_metadata: bool, files: list[Document]) -> list[int]:
    """Ids of one repository document, built piecewise so file text never becomes a special token.

    with metadata: <repo_name>repo<file_sep>path\\ncode<file_sep>path\\ncode...<|endoftext|>
    without:       <file_sep>code<file_sep>code...<|endoftext|>
    """
    ids = [tok.repo_name_id, *tok.encode(repo)] if with_metadata else []
    for f in files:
        ids.append(tok.file_sep_id)
        ids += tok.encode(f"{f.path}\n{f.text}" if with_metadata else f.text)
    ids.append(tok.eos_id)
    return ids


def _tokenize_one(item: tuple[str, bool, list[Document]]) -> np.ndarray:
    tok: Tokenizer = _WORKER["tokenizer"]
    return np.asarray(tokenize_repository(tok, *item), dtype=token_dtype(tok.vocab_size))


def write_jsonl(path: Path, docs: list[Document]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            row = {"text": d.text, "repo": d.repo, "path": d.path, "language": d.language,
                   "licence": d.licence, "licence_type": d.licence_type}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def prepare(sources: list[str | Path], out: str | Path, *, tokenizer: Tokenizer | None = None,
            config: DataConfig = DataConfig(), jsonl: str | Path | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> dict:
    """Run the pipeline; returns the manifest (also written to OUT/manifest.json when tokenized)."""
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    workers = config.workers or os.cpu_count() or 1
    sources = [str(Path(s).resolve()) for s in sources]
    stages: list[StageReport] = []

    def cached(name: str, key: str, run: Callable[[], tuple]) -> list[Document]:
        path = work / f"{name}.jsonl"
        hit = _load_stage(path, key)
        if hit is not None:
            log(f"{name}: reusing {path}")
            report, docs = hit
        else:
            report, docs = run()[:2]
            _save_stage(path, key, report, docs)
        stages.append(report)
        return docs

    # Source contents are part of the first key through their sizes and mtimes (cheap, and enough to
    # notice edited files); later keys chain the previous one.
    stamp = [(s, _tree_stamp(Path(s))) for s in sources]
    k1 = _key("ingest", stamp, list(config.exclude), dataclasses.asdict(config.filters))
    docs = cached("1-ingest", k1, lambda: stage_ingest(sources, config))
    k2 = _key("dedup", k1, config.near_dedup, dataclasses.asdict(config.dedup))
    docs = cached("2-dedup", k2, lambda: stage_dedup(docs, config))
    k3 = _key("clean", k2, config.decontaminate, config.benchmarks, dataclasses.asdict(config.pii))
    docs = cached("3-clean", k3, lambda: stage_clean(docs, config, workers, progress))
    if jsonl:
        write_jsonl(Path(jsonl), docs)
    manifest = build_manifest(sources, config, stages, Counter(stages[-1].counts), docs)
    log(format_report(manifest["stages"]))
    if tokenizer is None:
        log("no tokenizer given: stopping before tokenization (documents are cached for the next run)")
        return manifest
    manifest.update(tokenizer_vocab_size=tokenizer.vocab_size, dtype=token_dtype(tokenizer.vocab_size).str, shards=[])
    state = {"tokenizer": tokenizer}
    for split in ("train", "valid"):
        part = [d for d in docs if is_holdout(d, config) == (split == "valid")]
        if not part:
            continue
        items = repository_documents(part, config)
        arrays = _pool_map(_tokenize_one, items, state, workers, f"tokenize {split}", progress)
        manifest["shards"] += _write_shards(out, split, arrays, tokenizer.vocab_size, config.shard_tokens)
    write_manifest(out, manifest)
    total = sum(s["tokens"] for s in manifest["shards"])
    log(f"wrote {len(manifest['shards'])} shard(s), {total:,} tokens, to {out}")
    return manifest


# The manifest is shared with scaleout.py, whose merge step must write the same bytes.


def build_manifest(sources: list[str], config: DataConfig, stages: list[StageReport], pii: Counter,
                   docs: list[Document]) -> dict:
    """Everything but the shards, from the kept documents in their final order (only metadata is read)."""
    licences = Counter(d.licence or "none" for d in docs)
    languages = Counter(d.language for d in docs)
    return {
        "version": 1, "sources": sources, "seed": config.seed, "config": dataclasses.asdict(config),
        "stages": [dataclasses.asdict(s) for s in stages], "pii_redactions": dict(pii),
        "licences": dict(licences.most_common()), "languages": dict(languages.most_common()),
        "files": [{"repo": d.repo, "path": d.path, "licence": d.licence, "split": "valid" if is_holdout(d, config) else "train"}
                  for d in docs],
    }


def write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, out / "manifest.json")


def _jsonable(o: object) -> object:
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def _write_shards(out: Path, split: str, arrays: Iterable[np.ndarray], vocab_size: int, shard_tokens: int
                  ) -> list[dict]:
    shards, writer, docs = [], None, 0
    for arr in arrays:
        if writer is None:
            name = f"{split}-{len(shards):05d}.ds"
            writer = ShardWriter(out / name, vocab_size)
        writer.write(arr)
        docs += 1
        if writer.num_tokens >= shard_tokens:
            writer.close()
            shards.append({"file": name, "split": split, "documents": docs, "tokens": writer.num_tokens})
            writer, docs = None, 0
    if writer is not None:
        writer.close()
        shards.append({"file": name, "split": split, "documents": docs, "tokens": writer.num_tokens})
    return shards


def _tree_stamp(path: Path) -> str:
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for f in sorted(filenames):
            try:
                st = os.stat(os.path.join(dirpath, f))
            except OSError:
                continue
            h.update(f"{dirpath}/{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]

"""`starcoder2 data prepare` on datatrove's executors: many processes locally, or a Slurm cluster.

    prepare_distributed(sources, out, tokenizer_dir=tok, config=DataConfig(), tasks=64, workers=16)
    prepare_distributed(..., tasks=512, executor="slurm", slurm_options={"partition": "cpu", "time": "24:00:00"})

The stages are pipeline.py's own functions; datatrove only schedules them, as four executors
chained with `depends=`, which exchange files under OUT/work-dt/KEY/:

  1 ingest  N tasks  task r runs stage_ingest on source units r, r+N, ... (a unit is a directory, a
                     JSONL file, or the loose files of one directory: a repository never splits)
  2 dedup   1 task   stage_dedup over every unit in source order (global exact + near dedup), then N
                     partitions by crc32(repo) mod N, so that each holds whole repositories
  3 clean   N tasks  task r: the per-file filters, decontamination and PII of stage_clean, one file
                     after another (parallelism comes from tasks), then repository formatting and
                     tokenization of partition r
  4 merge   1 task   replays the per-file outcomes in the canonical (repo, path) order and writes the
                     repository documents in sorted repository order through prepare's shard writer

so OUT/*.ds, OUT/*.ds.index and OUT/manifest.json are byte-identical to `prepare(...)`'s with the same
config and tokenizer. Resuming is datatrove's: a finished task leaves
work-dt/KEY/logs/STEP/completions/RANK and a rerun skips it. KEY hashes the sources' sizes and mtimes,
the config, the tokenizer files and the task count (datatrove requires a fixed task count), so a
changed input starts a fresh directory; delete OUT/work-dt to reclaim the space.

Left out: steps 2 and 4 are one process each. stage_dedup holds every file in memory, exactly as
`prepare` does, so that step needs one large node; datatrove's four-stage MinHash would lift the limit
but keeps an arbitrary member of each cluster, not our best-ranked keeper (data-pipeline.md §5).
Paths are local or on a shared filesystem (no fsspec URLs); no `--jsonl` export, no progress bars.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer
from .document import Document
from .pipeline import (DataConfig, StageReport, _key, _nbytes, _tree_stamp, _write_shards, build_manifest,
                       clean_outcomes, format_report, is_holdout, repository_documents, stage_dedup, stage_ingest,
                       tokenize_repository, write_manifest)
from .shards import Shard, ShardWriter, token_dtype

SPLITS = ("train", "valid")
STEPS = ("1-ingest", "2-dedup", "3-clean", "4-merge")  # logging_dir names under work-dt/KEY/logs/


def source_units(sources: list[str]) -> list[list[str]]:
    """Cut `sources` into units that read_sources reads independently, in its reading order: the
    repositories of read_sources(sources) are those of read_sources(unit) for each unit in turn."""
    units: list[list[str]] = []
    loose: dict[Path, list[str]] = {}  # read_sources reads loose files last, one repository per directory
    for src in sources:
        path = Path(src)
        if path.is_dir() or path.name.endswith((".jsonl", ".jsonl.gz")):
            units.append([src])
        elif path.is_file():
            loose.setdefault(path.parent, []).append(src)
        else:
            raise FileNotFoundError(f"{src}: no such file or directory")
    return units + list(loose.values())


def partition_of(repo: str, partitions: int) -> int:
    """A stable partition for a repository name (Python's hash() is salted per process)."""
    return zlib.crc32(repo.encode("utf-8", "surrogatepass")) % partitions


# ---- intermediate files: JSONL, written under a temporary name and renamed when complete ---------------


def _write_rows(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")  # ASCII escapes: lone surrogates survive the round trip
    os.replace(tmp, path)


def _read_rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _merge_reports(reports: list[StageReport]) -> StageReport:
    """One report from per-unit reports, as if one pass had read the units in order (the reasons keep
    their first-seen order, so the manifest's JSON is the single-process one)."""
    merged = StageReport(reports[0].name)
    for r in reports:
        merged.kept_files += r.kept_files
        merged.kept_bytes += r.kept_bytes
        for reason, (files, nbytes) in r.dropped.items():
            entry = merged.dropped.setdefault(reason, [0, 0])
            entry[0] += files
            entry[1] += nbytes
    return merged


# ---- the four steps: datatrove calls each as step(data, rank, world_size) -------------------------------


@dataclass(frozen=True)
class IngestStep:
    """Step 1 (N tasks): read and licence source units rank, rank + N, ... -> ingest/unit-U.jsonl."""

    work: str
    units: list[list[str]] = field(repr=False)
    config: DataConfig = field(repr=False)

    def __call__(self, data: object, rank: int = 0, world_size: int = 1) -> None:
        for u in range(rank, len(self.units), world_size):
            path = Path(self.work) / "ingest" / f"unit-{u:05d}.jsonl"
            if path.is_file():  # finished by an earlier attempt of this task (files appear whole)
                continue
            report, docs = stage_ingest(self.units[u], self.config)
            _write_rows(path, itertools.chain([{"report": dataclasses.asdict(report)}], map(dataclasses.asdict, docs)))


@dataclass(frozen=True)
class DedupStep:
    """Step 2 (1 task): global exact + near dedup -> dedup/part-P.jsonl (whole repositories) + reports."""

    work: str
    num_units: int
    partitions: int
    config: DataConfig = field(repr=False)

    def __call__(self, data: object, rank: int = 0, world_size: int = 1) -> None:
        work = Path(self.work)
        reports, docs = [], []
        for u in range(self.num_units):  # source order: the order prepare hands stage_dedup
            rows = _read_rows(work / "ingest" / f"unit-{u:05d}.jsonl")
            reports.append(StageReport(**next(rows)["report"]))
            docs += [Document(**row) for row in rows]
        report, kept = stage_dedup(docs, self.config)  # kept: sorted by (repo, path), the canonical order
        parts: list[list[int]] = [[] for _ in range(self.partitions)]
        for i, doc in enumerate(kept):
            parts[partition_of(doc.repo, self.partitions)].append(i)
        for p, index in enumerate(parts):  # the header holds each file's canonical position
            rows = itertools.chain([{"index": index}], (dataclasses.asdict(kept[i]) for i in index))
            _write_rows(work / "dedup" / f"part-{p:05d}.jsonl", rows)
        _write_rows(work / "dedup" / "reports.jsonl", map(dataclasses.asdict, [_merge_reports(reports), report]))


@dataclass(frozen=True)
class CleanStep:
    """Step 3 (N tasks): clean, format and tokenize partition `rank` -> clean/files-P.jsonl, clean/SPLIT-P.ds."""

    work: str
    tokenizer_dir: str
    config: DataConfig = field(repr=False)

    def __call__(self, data: object, rank: int = 0, world_size: int = 1) -> None:
        work = Path(self.work)
        rows = _read_rows(work / "dedup" / f"part-{rank:05d}.jsonl")
        index = next(rows)["index"]
        docs = [Document(**row) for row in rows]
        records, kept = [], []
        for i, doc, (new, reason, counts) in zip(index, docs, clean_outcomes(docs, self.config, 1, False)):
            record = {"index": i, "repo": doc.repo, "path": doc.path, "language": doc.language, "licence": doc.licence}
            if new is None:
                record.update(dropped=reason, bytes=_nbytes(doc))
            else:
                record.update(bytes=_nbytes(new), pii=counts)
                kept.append(new)
            records.append(record)
        tok = Tokenizer.from_dir(self.tokenizer_dir)
        (work / "clean").mkdir(exist_ok=True)
        repos = {}
        for split in SPLITS:  # kept is in canonical order, so each repository's files are in prepare's order
            items = repository_documents([d for d in kept if is_holdout(d, self.config) == (split == "valid")],
                                         self.config)
            with ShardWriter(work / "clean" / f"{split}-{rank:05d}.ds", tok.vocab_size) as writer:
                for item in items:
                    writer.write(tokenize_repository(tok, *item))
            repos[split] = [repo for repo, _, _ in items]  # the repository of each document in the shard
        _write_rows(work / "clean" / f"files-{rank:05d}.jsonl", [{"repos": repos}, *records])


@dataclass(frozen=True)
class MergeStep:
    """Step 4 (1 task): OUT/SPLIT-NNNNN.ds and OUT/manifest.json, exactly as `prepare` writes them."""

    work: str
    out: str
    sources: list[str] = field(repr=False)
    tokenizer_dir: str
    partitions: int
    config: DataConfig = field(repr=False)

    def __call__(self, data: object, rank: int = 0, world_size: int = 1) -> None:
        work, out = Path(self.work), Path(self.out)
        stages = [StageReport(**row) for row in _read_rows(work / "dedup" / "reports.jsonl")]
        repos: dict[str, list[list[str]]] = {split: [] for split in SPLITS}  # [partition][document] -> repo
        records = []
        for p in range(self.partitions):
            rows = _read_rows(work / "clean" / f"files-{p:05d}.jsonl")
            header = next(rows)
            for split in SPLITS:
                repos[split].append(header["repos"][split])
            records += rows
        records.sort(key=lambda r: r["index"])
        # stage_clean's tally, replayed in the canonical order (dict key order included)
        report, pii, kept = StageReport("filter+pii"), Counter(), []
        for r in records:
            if "dropped" in r:
                report.drop(r["dropped"], r["bytes"])
            else:
                report.kept_files += 1
                report.kept_bytes += r["bytes"]
                pii.update(r["pii"])
                # metadata only: the manifest reads no text
                kept.append(Document(text="", repo=r["repo"], path=r["path"], language=r["language"],
                                     licence=r["licence"]))
        report.counts = dict(pii)
        manifest = build_manifest(self.sources, self.config, [*stages, report], pii, kept)
        vocab_size = Tokenizer.from_dir(self.tokenizer_dir).vocab_size
        dtype = token_dtype(vocab_size)
        manifest.update(tokenizer_vocab_size=vocab_size, dtype=dtype.str, shards=[])
        for split in SPLITS:
            if any(repos[split]):
                arrays = self._documents(split, repos[split], dtype)
                manifest["shards"] += _write_shards(out, split, arrays, vocab_size, self.config.shard_tokens)
        write_manifest(out, manifest)

    def _documents(self, split: str, repos: list[list[str]], dtype: np.dtype) -> Iterator[np.ndarray]:
        """Every partition's documents in sorted repository order (prepare's); a repository lives in
        one partition, in order, so sorting (repo, partition, position) keeps its documents' order."""
        shards = [Shard(Path(self.work) / "clean" / f"{split}-{p:05d}.ds", dtype) for p in range(len(repos))]
        for _, p, d in sorted((repo, p, d) for p, names in enumerate(repos) for d, repo in enumerate(names)):
            yield shards[p].document(d)


# ---- the executors ---------------------------------------------------------------------------------------


def prepare_distributed(sources: list[str | Path], out: str | Path, *, tokenizer_dir: str | Path,
                        config: DataConfig = DataConfig(), tasks: int, workers: int = -1, executor: str = "local",
                        slurm_options: dict | None = None, log: Callable[[str], None] = print) -> dict | None:
    """Run the pipeline as datatrove jobs; returns the manifest (local), or None once the Slurm jobs are queued.

    tasks: datatrove tasks of the per-repository and per-file steps (and partitions between them).
    workers: tasks running at once (-1: all; on Slurm the array's %W limit).
    slurm_options: SlurmPipelineExecutor arguments for every step (`partition` required, `time`
    defaults to 24:00:00, `venv_path` to this interpreter's venv); its "single_task" dict overrides
    them for the two one-task steps (more memory for global dedup).
    """
    if tasks < 1:
        raise ValueError(f"tasks={tasks} must be at least 1")
    if executor not in ("local", "slurm"):
        raise ValueError(f"executor={executor!r} is not 'local' or 'slurm'")
    if executor == "slurm":
        slurm_kwargs = {n: _slurm_kwargs(slurm_options, single_task=n == 1) for n in {1, tasks}}
    out = Path(out).resolve()
    sources = [str(Path(s).resolve()) for s in sources]
    units = source_units(sources)
    if not units:
        raise ValueError("no sources given")
    try:
        from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
    except ImportError as e:
        raise ImportError(f"scale-out needs datatrove: pip install 'starcoder2[scale]' ({e})") from e
    tokenizer_dir = str(Path(tokenizer_dir).resolve())
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "workers"}  # workers: no effect here
    key = _key("distributed", [(s, _tree_stamp(Path(s))) for s in sources], settings,
               _tree_stamp(Path(tokenizer_dir)), tasks)
    work = out / "work-dt" / key
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "plan.json").is_file():  # for people reading work-dt/; the steps carry their own inputs
        (work / "plan.json").write_text(json.dumps({"sources": sources, "units": units, "tasks": tasks,
                                                    "tokenizer": tokenizer_dir}, indent=1) + "\n")
    steps = [
        IngestStep(str(work), units, config),
        DedupStep(str(work), len(units), tasks, config),
        CleanStep(str(work), tokenizer_dir, config),
        MergeStep(str(work), str(out), sources, tokenizer_dir, tasks, config),
    ]
    num_tasks = [tasks, 1, tasks, 1]
    previous = None
    for name, step, n in zip(STEPS, steps, num_tasks):
        logging_dir = str(work / "logs" / name)
        if executor == "local":
            w = n if workers == -1 else max(1, min(workers, n))
            previous = LocalPipelineExecutor(pipeline=[step], tasks=n, workers=w, logging_dir=logging_dir,
                                             depends=previous)
        else:
            previous = SlurmPipelineExecutor(pipeline=[step], tasks=n, workers=workers, logging_dir=logging_dir,
                                             depends=previous, job_name=f"starcoder2-{name}",
                                             **slurm_kwargs[n])
    previous.run()  # runs (local) or queues (Slurm) its dependencies first; finished tasks are skipped
    if executor == "slurm":
        if previous.job_id == -1:
            log(f"every task has finished: {out} holds the shards and manifest.json")
        else:
            log(f"queued Slurm jobs (last: {previous.job_id}); logs and completions under {work / 'logs'}; "
                "when they have ended, the same command resumes whatever did not finish")
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    log(format_report(manifest["stages"]))
    log(f"wrote {len(manifest['shards'])} shard(s), {sum(s['tokens'] for s in manifest['shards']):,} tokens, to {out}")
    return manifest


def _slurm_kwargs(options: dict | None, single_task: bool) -> dict:
    options = dict(options or {})
    single = options.pop("single_task", {})
    if "partition" not in options:
        raise ValueError("slurm_options needs a 'partition'")
    options.setdefault("time", "24:00:00")
    if not {"venv_path", "env_command", "condaenv"} & options.keys() and sys.prefix != sys.base_prefix:
        options["venv_path"] = str(Path(sys.prefix) / "bin" / "activate")  # the jobs run this interpreter's venv
    return {**options, **(single if single_task else {})}

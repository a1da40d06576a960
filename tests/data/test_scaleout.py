"""Scale-out on datatrove: the local executor with 2 tasks writes the single-process run's bytes, reruns
skip finished tasks, and the Slurm launch chains four array jobs whose tasks write the same bytes."""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="datatrove is not installed (pip install -e '.[scale]')")

from starcoder2.data.ingest import read_sources  # noqa: E402
from starcoder2.data.pipeline import DataConfig, prepare  # noqa: E402
from starcoder2.data.scaleout import STEPS, prepare_distributed, source_units  # noqa: E402
from starcoder2.tokenizer import Tokenizer  # noqa: E402
from tests.data.test_pipeline import BENCH_SOLUTION, GPL, MIT  # noqa: E402  (the same licence fixtures)

DATATROVE_ENV = ("DATATROVE_NODE_RANK", "DATATROVE_EXECUTOR", "DATATROVE_NODE_IPS", "DATATROVE_CPUS_PER_TASK",
                 "DATATROVE_MEM_PER_CPU", "DATATROVE_GPUS_ON_NODE")


def _module(name: str) -> str:
    return inspect.getsource(importlib.import_module(name))


@pytest.fixture(autouse=True)
def _restore_datatrove_env(monkeypatch):
    """Tasks run in this process set DATATROVE_* variables; monkeypatch puts the old values back."""
    for name in DATATROVE_ENV:
        monkeypatch.setenv(name, "")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Path], Path]:
    """Six sources in no particular order: four repositories, a JSONL file holding two more, a loose file."""
    root = tmp_path_factory.mktemp("corpus")
    mit = root / "mit_repo"
    (mit / "pkg").mkdir(parents=True)
    (mit / "LICENSE").write_text(MIT)
    (mit / "pkg" / "wrap.py").write_text(_module("textwrap"))
    (mit / "settings.py").write_text('ADMIN = "jane.doe@corp-mail.io"\n' + _module("colorsys"))
    (mit / "search.py").write_text(_module("bisect"))
    gpl = root / "gpl_repo"
    gpl.mkdir()
    (gpl / "COPYING").write_text(GPL)
    (gpl / "main.py").write_text(_module("fnmatch"))
    plain = root / "plain_repo"
    plain.mkdir()
    (plain / "shlex.py").write_text(_module("shlex"))
    (plain / "ok.py").write_text(_module("glob"))
    (plain / "solution.py").write_text("# copied from a benchmark\n" + BENCH_SOLUTION.upper())
    tools = root / "tools_repo"
    tools.mkdir()
    near = _module("shlex").replace("def split(", "def split_words(").replace("posix", "posix_mode", 3)
    (tools / "shlex_edit.py").write_text(near)  # near duplicate of plain_repo/shlex.py
    (tools / "wrap_copy.py").write_text(_module("textwrap"))  # exact duplicate of mit_repo/pkg/wrap.py
    (tools / "queue_tools.py").write_text(_module("heapq"))
    rows = [{"repo": "org/alpha", "path": "src/string_mod.py", "content": _module("string"), "stars": 3},
            {"repo": "org/beta", "path": "stat_mod.py", "content": _module("stat")},
            {"repo": "org/alpha", "path": "src/calendar_mod.py", "content": _module("calendar"), "stars": 3}]
    (root / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "loose").mkdir()
    (root / "loose" / "one.py").write_text(_module("copy"))
    bench = root / "bench"
    bench.mkdir()
    with gzip.open(bench / "MbppPlus.jsonl.gz", "wt") as f:
        f.write(json.dumps({"task_id": "Mbpp/1", "prompt": '"""\nCheck a number.\n"""\n',
                            "canonical_solution": BENCH_SOLUTION, "entry_point": "is_palindrome_number"}) + "\n")
    sources = [plain, root / "extra.jsonl", mit, root / "loose" / "one.py", gpl, tools]
    return sources, bench


@pytest.fixture(scope="module")
def config(corpus) -> DataConfig:
    # small shards and documents so that shard boundaries and split repositories are exercised
    return DataConfig(benchmarks=str(corpus[1]), workers=1, holdout=0.25, shard_tokens=6000,
                      max_document_chars=30_000)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save(out)
    return out


@pytest.fixture(scope="module")
def single(corpus, config, tok_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    prepare(corpus[0], out, tokenizer=Tokenizer.from_dir(tok_dir), config=config, progress=False, log=lambda m: None)
    return out


def _outputs(out: Path) -> dict[str, bytes]:
    """The files a trainer reads: shards, their indexes and the manifest."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name == "manifest.json" or p.name.endswith((".ds", ".ds.index"))}


def _work(out: Path) -> Path:
    (work,) = (out / "work-dt").iterdir()
    return work


def _completions(work: Path, step: str) -> list[str]:
    return sorted(p.name for p in (work / "logs" / step / "completions").iterdir())


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_source_units_read_like_read_sources(corpus):
    sources = [str(Path(s).resolve()) for s in corpus[0]]
    units = source_units(sources)
    assert len(units) == len(sources) and units[-1] == [sources[3]]  # loose files come last, as read_sources reads them
    whole = [(r.name, [d.path for d in r.docs]) for r in read_sources(sources, 1 << 20)]
    pieces = [(r.name, [d.path for d in r.docs]) for u in units for r in read_sources(u, 1 << 20)]
    assert pieces == whole and "org/alpha" in dict(whole) and "loose" in dict(whole)
    with pytest.raises(FileNotFoundError):
        source_units([*sources, "/nonexistent/dir"])


def test_local_executor_with_two_tasks_writes_the_single_process_bytes(corpus, config, tok_dir, single, tmp_path):
    manifest = prepare_distributed(corpus[0], tmp_path, tokenizer_dir=tok_dir, config=config, tasks=2, workers=2,
                                   log=lambda m: None)
    expected = _outputs(single)
    assert _outputs(tmp_path) == expected  # every shard, index and the manifest, byte for byte
    assert manifest == json.loads(expected["manifest.json"])
    splits = [s["split"] for s in manifest["shards"]]
    assert splits.count("train") >= 2 and "valid" in splits  # several shards, both splits
    dropped = {reason for s in manifest["stages"] for reason in s["dropped"]}
    assert {"licence:non_permissive", "exact_duplicate", "near_duplicate", "contaminated"} <= dropped
    assert manifest["pii_redactions"]["EMAIL"] >= 1  # jane.doe@..., and an address in a stdlib module
    work = _work(tmp_path)
    assert [len(_completions(work, step)) for step in STEPS] == [2, 1, 2, 1]
    for p in range(2):  # both partitions hold repositories, so both clean tasks did real work
        assert len((work / "dedup" / f"part-{p:05d}.jsonl").read_text().splitlines()) > 1


def test_rerun_skips_finished_tasks(corpus, config, tok_dir, single, tmp_path):
    run = lambda: prepare_distributed(corpus[0], tmp_path, tokenizer_dir=tok_dir, config=config, tasks=2,  # noqa: E731
                                      workers=1, log=lambda m: None)
    run()
    before = _mtimes(tmp_path)
    run()  # every completion marker is present: nothing is rewritten
    assert _mtimes(tmp_path) == before
    # a clean task that did not finish (and so the merge after it): only those two run again
    work = _work(tmp_path)
    (work / "logs" / "3-clean" / "completions" / "00001").unlink()
    (work / "logs" / "4-merge" / "completions" / "00000").unlink()
    run()
    after = _mtimes(tmp_path)
    rel = lambda p: str(p.relative_to(tmp_path))  # noqa: E731
    unchanged = [*(work / "ingest").iterdir(), *(work / "dedup").iterdir(), work / "clean" / "files-00000.jsonl",
                 work / "clean" / "train-00000.ds"]
    assert all(after[rel(p)] == before[rel(p)] for p in unchanged)
    assert after[rel(work / "clean" / "files-00001.jsonl")] > before[rel(work / "clean" / "files-00001.jsonl")]
    assert after[rel(tmp_path / "manifest.json")] > before[rel(tmp_path / "manifest.json")]
    assert _outputs(tmp_path) == _outputs(single)


def test_slurm_launch_chains_array_jobs_whose_tasks_write_the_same_bytes(corpus, config, tok_dir, single, tmp_path,
                                                                         monkeypatch):
    import dill
    import datatrove.executor.slurm as slurm

    jobs = []  # (sbatch script, sbatch arguments) in launch order; sbatch itself is not called

    def sbatch(script, job_id_retriever, *args):
        jobs.append((script, args))
        return str(100 + len(jobs))

    monkeypatch.setattr(slurm, "launch_slurm_job", sbatch)
    with pytest.raises(ValueError, match="partition"):
        prepare_distributed(corpus[0], tmp_path, tokenizer_dir=tok_dir, config=config, tasks=2, executor="slurm")
    assert not jobs and not (tmp_path / "work-dt").exists()  # checked before anything is written or queued
    options = {"partition": "cpu", "time": "0:30:00", "requeue_signals": None, "single_task": {"mem_per_cpu_gb": 8}}
    assert prepare_distributed(corpus[0], tmp_path, tokenizer_dir=tok_dir, config=config, tasks=2, executor="slurm",
                               slurm_options=options, log=lambda m: None) is None
    pipeline_jobs = [(i, script, args) for i, (script, args) in enumerate(jobs) if "launch_pickled_pipeline" in script]
    assert len(pipeline_jobs) == 4 and not list(tmp_path.glob("*.ds"))  # queued, nothing run
    for k, (step, n, (i, script, args)) in enumerate(zip(STEPS, [2, 1, 2, 1], pipeline_jobs)):
        assert f"--job-name=starcoder2-{step}" in script and "--partition=cpu" in script
        assert f"--array=0-{n - 1}" in script and "--time=0:30:00" in script
        assert ("--mem-per-cpu=8G" in script) == (n == 1)
        if k:  # each step waits for the previous step's array job (its id is the launch's return value)
            assert f"--dependency=afterok:{100 + pipeline_jobs[k - 1][0] + 1}" in args

    # what each array task does on a compute node: unpickle the step's executor and run its rank
    monkeypatch.setattr(slurm, "expand_slurm_nodelist", lambda nodelist: ["localhost"])
    monkeypatch.setenv("SLURM_NODELIST", "localhost")
    work = _work(tmp_path)
    for step, n in zip(STEPS, [2, 1, 2, 1]):
        with open(work / "logs" / step / "executor.pik", "rb") as f:
            executor = dill.load(f)
        for task in range(n):
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
            executor.run()
    assert _outputs(tmp_path) == _outputs(single)

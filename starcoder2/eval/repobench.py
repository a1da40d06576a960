"""A repository-level completion benchmark built from any git repository (`starcoder2 eval repo`).

    report = evaluate_repo("path/to/repo", lm=starcoder2.load(), settings=RepoBenchSettings(seed=0, n=20))
    print(markdown_table(report))

What it measures: how well the model completes code at cursor positions inside a repository, with
four kinds of context (modes) and three kinds of holes (kinds):

    modes  none       the prefix only, plain left-to-right completion (no suffix, no other files)
           file       the current file only: PSM FIM over prefix and suffix
           commented  retrieved snippets + imported definitions as `# Path:` comment blocks above
                      the prefix (what editor clients such as Tabby and Continue send), + FIM
           native     the same context in StarCoder2's repository format (`<repo_name>`,
                      `<file_sep>path\\n...`), the current file as the FIM segment (reference §7.4)
    kinds  single     the rest of one line, after an offset that does not split an identifier
           multi      a block of 2-8 whole lines (Python: consecutive statements of one body)
           function   a whole function body (Python via ast, after the docstring; brace languages
                      via the chunker's function chunks, between the braces)

Determinism: files are held out by a seeded hash of their path (`holdout` of them, at least one);
cursors are drawn from held-out files with `random.Random(seed)` over sorted lists, so one seed gives
the same benchmark on any machine; decoding is greedy.

Leakage: the hole exists only in its own file. Retrieval searches the index of the repository with
that file excluded (`search(..., exclude_path=)`), and definitions found in that file are dropped, so
neither the target span nor the rest of its file can come back as "repository context"; the current
file reaches the prompt only as the prefix and suffix. The other files stay indexed whole, as they
are in an editor (held-out files are where cursors are sampled, not files hidden from retrieval).

Metrics per completion (after the editor post-processing, `repo.postprocess`; eval/similarity.py):
exact match, edit similarity (RepoBench, CrossCodeEval) and identifier F1 (CrossCodeEval). With a test command (given, or
pytest when the repository has tests), whether the repository's tests still pass with the
completion in place: each run is one sandbox program (`eval.sandbox`) that unpacks an embedded copy
of the repository, writes the completed file and runs the command; bounded by `test_timeout_s`.
pytest comes from this interpreter's environment (its directory is put on PYTHONPATH), because the
sandbox may run programs on the system python3. Completions equal to the target reuse the baseline
run; runs are cached per file content. If the untouched repository fails its own tests, no test
results are reported.

Held-out loss: the model's next-token loss over the held-out files (each in its own windows of
`loss_seq_len` tokens). Before and after fine-tuning: `before_after` joins two runs on the same
cursors into one report (`eval repo --baseline`); `finetune --repo` holds out the same files.

Results go to a JSONL file line by line (a rerun skips what is there, as eval/runner.py).
Not covered: sampled decoding, cursor positions inside comments or docstrings, languages other
than Python for the block kinds' statement boundaries.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.util
import io
import math
import os
import random
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .runner import ResultsFile
from .sandbox import SandboxLimits, run_many
from .similarity import edit_similarity, exact_match, identifier_f1

MODES = ("none", "file", "commented", "native")
KINDS = ("single", "multi", "function")
TABLE_HEAD = ["mode", "kind", "n", "exact match", "edit sim", "identifier F1", "tests pass"]  # Markdown tables
MAX_NEW_TOKENS = {"single": 48, "multi": 128, "function": 256}  # generation usually ends earlier: _decided
MULTI_LINES = (2, 8)  # a multi-line hole spans this many lines
MAX_FUNCTION_LINES = 30  # longer bodies would not fit MAX_NEW_TOKENS
RETRIEVED_SNIPPETS = 8
LANGUAGES = {".py": "python", ".js": "javascript", ".jsx": "javascript", ".ts": "typescript", ".java": "java",
             ".go": "go", ".rs": "rust", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp"}
MAX_ARCHIVE_BYTES = 16 << 20  # the repository copy embedded in each test program
_TEST_PROGRAM = """\
import base64, io, os, subprocess, sys, zipfile
zipfile.ZipFile(io.BytesIO(base64.b64decode({archive!r}))).extractall("repo")
root = os.path.abspath("repo")
with open(os.path.join(root, {path!r}), "w", encoding="utf-8", newline="") as f:
    f.write({content!r})
env = {{k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}}
env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "src"), *{extra_path!r}])
env["PYTHONDONTWRITEBYTECODE"] = "1"
sys.exit(subprocess.run({command!r}.replace("{{python}}", sys.executable), shell=True, cwd=root,
                        env=env).returncode)
"""
DEFAULT_TEST_COMMAND = "{python} -m pytest -x -q -p no:cacheprovider"


@dataclass(kw_only=True)
class RepoBenchSettings:
    seed: int = 0
    n: int = 20  # cursor positions per kind
    modes: tuple[str, ...] = MODES
    kinds: tuple[str, ...] = KINDS
    holdout: float = 0.2  # fraction of the files cursors are sampled from
    budget: int = 2048  # prompt tokens (context files are cut first, then the prefix, then the suffix)
    batch_size: int = 8  # engine rows
    tests: bool = True  # run the repository's tests with each completion in place
    test_cmd: str | None = None  # shell command in the repository copy; None: pytest when there are tests
    test_timeout_s: float = 120.0
    workers: int | None = None  # sandbox processes (None: the sandbox's default)
    loss_seq_len: int = 512  # held-out loss over the held-out files in windows of this many tokens; 0: none

    def __post_init__(self) -> None:
        self.modes, self.kinds = tuple(self.modes), tuple(self.kinds)
        for name, given, allowed in (("mode", self.modes, MODES), ("kind", self.kinds, KINDS)):
            bad = [x for x in given if x not in allowed]
            if bad or not given:
                what = repr(bad[0]) if bad else "(none given)"
                raise ValueError(f"unknown {name} {what}; choose from {', '.join(allowed)}")
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if not 0 < self.holdout <= 1:
            raise ValueError(f"--holdout must be in (0, 1], got {self.holdout}")
        if self.budget < 64:
            raise ValueError(f"the prompt budget must be >= 64 tokens, got {self.budget}")
        if self.batch_size < 1 or self.test_timeout_s <= 0 or self.loss_seq_len < 0:
            raise ValueError("batch size and test timeout must be positive, the loss window not negative")

    def run_key(self) -> dict:
        """What makes two runs comparable (a results file holds one run)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if k not in ("batch_size", "workers", "loss_seq_len")}  # lists: as the results file's JSON reads back


@dataclass(frozen=True)
class Cursor:
    """A hole in one file: prefix = text[:start], target = text[start:end], suffix = text[end:]."""

    kind: str
    path: str
    language: str
    start: int  # character offsets
    end: int

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.path}:{self.start}-{self.end}"


# ---- sampling cursors ---------------------------------------------------------------------------------


def language_of(path: str) -> str | None:
    return LANGUAGES.get(os.path.splitext(path)[1].lower())


def held_out(paths: list[str], fraction: float, seed: int) -> list[str]:
    """The files a seeded hash of their path puts below `fraction`; at least the lowest one."""
    def h(p: str) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}\0{p}".encode()).digest()[:8], "big") / 2**64
    ranked = sorted(paths, key=h)
    return sorted(p for p in ranked if h(p) < fraction) or ranked[:1]


def _line_starts(text: str) -> list[int]:
    starts = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            starts.append(i + 1)
    return starts


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _is_code(line: str, language: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#" if language == "python" else ("//", "/*", "*"))


def _python_docstring_lines(tree: ast.AST) -> set[int]:
    """1-based numbers of lines inside string-only statements (docstrings, bare string literals)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return out


def _span(starts: list[int], lines: list[str], first: int, last: int) -> tuple[int, int]:
    """Characters of 0-based lines first..last, from the first line's indentation to the last line's
    end (its newline stays in the suffix)."""
    return starts[first] + _indent(lines[first]), starts[last] + len(lines[last].rstrip("\r"))


def single_line_spans(text: str, language: str, rng: random.Random,
                      skip: set[int] = frozenset()) -> list[tuple[int, int]]:
    """One hole per code line: from an offset (the indentation's end, or after a non-identifier
    character) to the end of the line, leaving at least 2 characters to complete."""
    starts, lines, out = _line_starts(text), _lines(text), []
    for i, line in enumerate(lines):
        body = line.rstrip()
        if not _is_code(body, language) or (i + 1) in skip or len(body.strip()) < 4:
            continue
        ind = _indent(body)
        offsets = [ind] + [j for j in range(ind + 1, len(body) - 1)
                           if not (body[j - 1].isalnum() or body[j - 1] == "_") and not body[j].isspace()]
        offsets = [j for j in offsets if len(body[j:].strip()) >= 2]
        if offsets:
            j = rng.choice(offsets)
            out.append((starts[i] + j, starts[i] + len(body)))
    return out


def multi_line_spans(text: str, language: str, rng: random.Random) -> list[tuple[int, int]]:
    """Blocks of 2-8 lines: in Python, runs of consecutive statements of one body (so a hole is
    whole statements); elsewhere, windows of lines starting and ending on code lines."""
    starts, lines = _line_starts(text), _lines(text)
    lo, hi = MULTI_LINES
    out = []
    if language == "python":
        try:
            tree = ast.parse(text)
        except SyntaxError:
            return []
        doc = _python_docstring_lines(tree)
        for node in ast.walk(tree):
            for name in ("body", "orelse", "finalbody"):
                body = getattr(node, name, None)
                if not isinstance(body, list) or not body or not isinstance(body[0], ast.stmt):
                    continue
                for i, stmt in enumerate(body):
                    first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
                    if first in doc:
                        continue
                    ends = [s.end_lineno for s in body[i:] if lo <= s.end_lineno - first + 1 <= hi]
                    if ends:
                        out.append(_span(starts, lines, first - 1, rng.choice(ends) - 1))
        return sorted(set(out))
    for i in range(len(lines)):
        if not _is_code(lines[i], language):
            continue
        ends = [j for j in range(i + lo - 1, min(i + hi, len(lines))) if _is_code(lines[j], language)]
        if ends:
            out.append(_span(starts, lines, i, rng.choice(ends)))
    return out


def function_body_spans(text: str, language: str, path: str = "") -> list[tuple[int, int]]:
    """Whole function bodies: Python after the docstring; brace languages between the braces of
    the chunker's function chunks. At most MAX_FUNCTION_LINES lines."""
    starts, lines, out = _line_starts(text), _lines(text), []
    if language == "python":
        try:
            tree = ast.parse(text)
        except SyntaxError:
            return []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]
            if not body or body[0].lineno == node.lineno:  # empty, or `def f(): return 1`
                continue
            first, last = body[0].lineno, body[-1].end_lineno
            if last - first + 1 <= MAX_FUNCTION_LINES:
                out.append(_span(starts, lines, first - 1, last - 1))
        return sorted(out)
    from ..repo import chunk_file
    for chunk in chunk_file(path, text):
        if chunk.kind not in ("function", "method"):
            continue
        first, last = chunk.start_line, chunk.end_line  # 1-based, inclusive
        # The body: the lines after the one that opens the brace, up to the line before the closing one.
        open_line = next((k for k in range(first, last + 1) if "{" in lines[k - 1]), None)
        if open_line is None or not lines[last - 1].strip().startswith("}"):
            continue
        body = [k for k in range(open_line + 1, last) if lines[k - 1].strip()]
        if body and body[-1] - body[0] + 1 <= MAX_FUNCTION_LINES:
            out.append(_span(starts, lines, body[0] - 1, body[-1] - 1))
    return sorted(out)


def spans(kind: str, path: str, text: str, language: str, seed: int) -> list[tuple[int, int]]:
    """Every candidate hole of one kind in one file (offsets and block ends drawn per file and seed)."""
    rng = random.Random(f"{seed}:{kind}:{path}")
    if kind == "single":
        skip: set[int] = set()
        if language == "python":
            try:
                skip = _python_docstring_lines(ast.parse(text))
            except SyntaxError:
                return []
        return single_line_spans(text, language, rng, skip)
    if kind == "multi":
        return multi_line_spans(text, language, rng)
    return function_body_spans(text, language, path)


def sample_cursors(files: dict[str, str], settings: RepoBenchSettings) -> list[Cursor]:
    """`n` cursors per kind from the held-out files: a file drawn uniformly among those with holes
    left, then a hole in it, so one large file does not dominate."""
    code = {p: t for p, t in files.items() if language_of(p)}
    if not code:
        raise ValueError("the repository has no source files in a supported language "
                         f"({', '.join(sorted(set(LANGUAGES.values())))})")
    chosen = held_out(sorted(code), settings.holdout, settings.seed)
    cursors = []
    for kind in settings.kinds:
        rng = random.Random(f"{settings.seed}:{kind}")
        pool = {p: spans(kind, p, code[p], language_of(p), settings.seed) for p in chosen}
        pool = {p: s for p, s in pool.items() if s}
        for _ in range(settings.n):
            if not pool:
                break
            path = rng.choice(sorted(pool))
            start, end = pool[path].pop(rng.randrange(len(pool[path])))
            if not pool[path]:
                del pool[path]
            cursors.append(Cursor(kind, path, language_of(path), start, end))
    return cursors


# ---- prompts ------------------------------------------------------------------------------------------


def build_prompt(mode: str, lm, index, cursor: Cursor, text: str, settings: RepoBenchSettings,
                 repo_name: str) -> list[int]:
    """The prompt ids of one (cursor, mode), at most `settings.budget` tokens. Retrieval excludes the
    current file (`build_context` searches with exclude_path, and `assemble` drops any part of it)."""
    from ..repo import ContextConfig, build_context

    tok = lm.tokenizer
    prefix, suffix = text[:cursor.start], text[cursor.end:]
    if mode == "none":
        return tok.encode(prefix)[-settings.budget:] or [tok.eos_id]
    config = ContextConfig(budget=settings.budget, style=mode, max_snippets=RETRIEVED_SNIPPETS)
    return build_context(index, tok, path=cursor.path, prefix=prefix, suffix=suffix, config=config,
                         repo_name=repo_name).ids


# ---- generation ---------------------------------------------------------------------------------------


def generate(lm, jobs: list[tuple[object, list[int], int]], batch_size: int, on_done, decided=None) -> None:
    """Greedy completions of (key, prompt ids, max new tokens) through one Engine; `on_done(key,
    text)` as each finishes (continuous batching, at most batch_size rows). `decided(key, text)`,
    asked whenever a completion has grown a new line, may end it early: True when more tokens can
    no longer change what post-processing keeps."""
    from ..infer.engine import Engine
    from ..infer.generate import SamplingParams
    from ..prompts import default_stop_ids

    if not jobs:
        return
    stop_ids = sorted(set(default_stop_ids(lm.tokenizer)) | {lm.tokenizer.eos_id})
    ctx = lm.model.config.max_position_embeddings
    engine = Engine(lm.model, lm.tokenizer, max_batch=batch_size,
                    max_seq_len=min(ctx, max(len(ids) + new for _, ids, new in jobs) + 1))

    def watch(key):
        def on_event(ev) -> None:  # runs inside engine.step(); cancel() then ends the request after the step
            if decided is not None and "\n" in ev.text and not ev.finished and decided(key, ev.request.text):
                engine.cancel(ev.request)
        return on_event

    queue, inflight = list(jobs)[::-1], []
    while queue or inflight:
        while queue and len(inflight) < batch_size:
            key, ids, new = queue.pop()
            params = SamplingParams(max_new_tokens=new, temperature=0.0, stop_token_ids=stop_ids)
            inflight.append((key, engine.submit(ids, params, on_event=watch(key))))
        engine.step()
        still = []
        for key, req in inflight:
            if req.finished:
                on_done(key, req.text)
            else:
                still.append((key, req))
        inflight = still


# ---- repository tests ---------------------------------------------------------------------------------


def detect_test_command(root: Path) -> str | None:
    """pytest when the repository has test files and pytest is importable here."""
    if importlib.util.find_spec("pytest") is None:
        return None
    for path in root.rglob("*.py"):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if path.name.startswith("test_") or path.name.endswith("_test.py") or path.name == "conftest.py":
            return DEFAULT_TEST_COMMAND
    return None


def repo_archive(root: Path) -> bytes:
    """The repository as a zip (hidden files and folders, __pycache__ and files over 1 MiB left out)."""
    buf = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts) or not path.is_file():
                continue
            size = path.stat().st_size
            if size > 1 << 20:
                continue
            total += size
            if total > MAX_ARCHIVE_BYTES:
                raise ValueError(f"{root} holds more than {MAX_ARCHIVE_BYTES >> 20} MiB of files: too large to "
                                 f"copy into every test run (use --no-tests)")
            z.write(path, rel.as_posix())
    return buf.getvalue()


class RepoTests:
    """Runs the repository's test command with one file replaced, in the sandbox; cached by content."""

    def __init__(self, root: Path, command: str, timeout_s: float, workers: int | None):
        import pytest  # noqa: F401 - only to locate its directory for PYTHONPATH

        self.archive = base64.b64encode(repo_archive(root)).decode()
        self.command, self.workers = command, workers
        self.extra_path = [str(Path(importlib.util.find_spec("pytest").origin).parents[1])]
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=2048, open_files=256, processes=128)
        self.cache: dict[str, str] = {}

    def program(self, path: str, content: str) -> str:
        return _TEST_PROGRAM.format(archive=self.archive, path=path, content=content, extra_path=self.extra_path,
                                    command=self.command)

    def run(self, files: list[tuple[str, str]]) -> list[str]:
        """Status ("passed" | "failed" | "timeout" | "error") per (path, full file content)."""
        keys = [hashlib.sha256(f"{p}\0{c}".encode()).hexdigest() for p, c in files]
        todo = {k: f for k, f in zip(keys, files) if k not in self.cache}
        if todo:
            results = run_many([self.program(p, c) for p, c in todo.values()], self.limits, workers=self.workers)
            for k, res in zip(todo, results):
                self.cache[k] = res.status
        return [self.cache[k] for k in keys]


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class _Item:
    cursor: Cursor
    mode: str
    text: str  # the whole file


def _postprocess(it: _Item, completion: str) -> str:
    from ..repo import postprocess

    c = it.cursor
    return postprocess(completion, prefix=it.text[:c.start], suffix=it.text[c.end:],
                       mode="single" if c.kind == "single" else "multi", language=c.language)


def _decided(it: _Item, completion: str) -> bool:
    """Post-processing left out a complete, non-blank line of the completion: where it cuts is then
    settled (a block has ended, a line is complete), so more tokens would be thrown away."""
    kept = _postprocess(it, completion)
    complete = completion.split("\n")[:-1]  # lines ended by a newline
    return any(line.strip() for line in complete[kept.count("\n") + 1 if kept else 0:])


def _judge(items: list[_Item], completions: dict[tuple[str, str], str], runner: RepoTests | None,
           baseline: str | None) -> list[dict]:
    records = []
    for it in items:
        c = it.cursor
        target = it.text[c.start:c.end]
        raw = completions[(it.mode, c.id)]
        pred = _postprocess(it, raw)
        records.append({"task_id": f"{it.mode}|{c.id}", "sample": 0, "mode": it.mode, "kind": c.kind, "path": c.path,
                        "target": target, "completion": raw, "prediction": pred,
                        "exact_match": exact_match(pred, target), "edit_similarity": edit_similarity(pred, target),
                        "identifier_f1": identifier_f1(pred, target, c.language)})
    if runner is not None and baseline == "passed":
        need = [(r, it) for r, it in zip(records, items) if not r["exact_match"]]
        statuses = runner.run([(it.cursor.path, it.text[:it.cursor.start] + r["prediction"] + it.text[it.cursor.end:])
                               for r, it in need])
        for r in records:
            r["tests"] = "passed"  # an exact match leaves the file as it was (up to whitespace)
        for (r, _), status in zip(need, statuses):
            r["tests"] = status
    return records


def evaluate_repo(root: str | Path, *, lm, settings: RepoBenchSettings | None = None, results: str | Path | None = None,
                  model_name: str | None = None, index_path: str | Path | None = None, progress: bool = True,
                  log=print) -> dict:
    """Sample cursors, build the prompts of every mode, complete, score; the report dict."""
    from tqdm import tqdm

    from ..repo import RepoIndex

    settings = settings or RepoBenchSettings()
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    t0 = time.perf_counter()
    index = RepoIndex.open(root, db_path=index_path)
    index.update(show_progress=progress)
    files = {p: index.read(p) for p in index.files() if language_of(p)}
    cursors = sample_cursors(files, settings)
    repo_name = root.name
    digest = hashlib.sha256("".join(f"{p}\0{hashlib.sha256(files[p].encode()).hexdigest()}\n"
                                    for p in sorted(files)).encode()).hexdigest()[:16]
    run = {"task": "repo", "repo": repo_name, "files_sha256": digest, "model": model_name, **settings.run_key()}
    store = ResultsFile(results, run)
    items = [_Item(c, m, files[c.path]) for c in cursors for m in settings.modes
             if (f"{m}|{c.id}", 0) not in store]

    runner, baseline, command = None, None, None
    if settings.tests:
        command = settings.test_cmd or detect_test_command(root)
        if command:
            runner = RepoTests(root, command, settings.test_timeout_s, settings.workers)
            baseline = runner.run([(cursors[0].path, files[cursors[0].path])])[0] if cursors else None
            log(f"tests: `{command}` on the untouched repository: {baseline}")

    jobs = []
    for it in tqdm(items, desc="prompts", unit="prompt", disable=not progress or not items, dynamic_ncols=True):
        ids = build_prompt(it.mode, lm, index, it.cursor, it.text, settings, repo_name)
        jobs.append(((it.mode, it.cursor.id), ids, MAX_NEW_TOKENS[it.cursor.kind]))
    completions: dict[tuple[str, str], str] = {}
    pending = {(it.mode, it.cursor.id): it for it in items}
    buffer: list[_Item] = []
    chunk = max(16, 2 * (settings.workers or 2))
    with tqdm(total=len(items), desc=f"repo {repo_name}", unit="completion", disable=not progress or not items,
              dynamic_ncols=True) as bar:
        def done(key, text):
            completions[key] = text
            buffer.append(pending[key])
            if len(buffer) >= chunk:
                flush()

        def flush():
            store.add(_judge(buffer, completions, runner, baseline))
            bar.update(len(buffer))
            buffer.clear()

        generate(lm, jobs, settings.batch_size, done, decided=lambda key, text: _decided(pending[key], text))
        if buffer:
            flush()
    index.close()
    keys = {f"{m}|{c.id}" for c in cursors for m in settings.modes}
    records = [r for (tid, _), r in store.records.items() if tid in keys]
    report = score(records, settings)
    held = held_out(sorted(files), settings.holdout, settings.seed)
    if settings.loss_seq_len:
        report["held_out_loss"] = held_out_loss(lm, [files[p] for p in held], settings.loss_seq_len)
    report.update(repo=str(root), repo_name=repo_name, files=len(files), files_sha256=digest, held_out_files=held,
                  cursors=len(cursors), model=model_name, settings=settings.run_key(), test_command=command,
                  tests_baseline=baseline, results_file=str(results) if results else None,
                  elapsed_s=round(time.perf_counter() - t0, 2))
    return report


# ---- scoring and output -------------------------------------------------------------------------------


def held_out_loss(lm, texts: list[str], seq_len: int) -> dict:
    """Next-token loss of `lm` over the held-out files, each cut into its own windows of seq_len."""
    import numpy as np

    from .tasks import text_windows, windows_nll

    seq_len = min(seq_len, lm.config.max_position_embeddings)
    windows = [w for t in texts for w in text_windows(np.asarray(lm.tokenizer.encode(t), dtype=np.int64), seq_len)]
    if not windows:
        return {"loss": None, "tokens": 0, "seq_len": seq_len}
    nll, tokens = windows_nll(lm.model, windows)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"loss": nll / tokens, "bits_per_byte": nll / math.log(2) / n_bytes, "tokens": tokens,
            "windows": len(windows), "seq_len": seq_len}


def before_after(before: dict, after: dict) -> dict:
    """One report from two runs on the same cursors: the base model, then the fine-tuned one."""
    for key in ("files_sha256", "settings", "cursors"):
        if before.get(key) != after.get(key):
            raise ValueError(f"before and after differ in {key}: they must evaluate the same cursors")
    return {"task": "repo-before-after", "repo": after["repo"], "repo_name": after["repo_name"],
            "held_out_files": after["held_out_files"], "before": before, "after": after}


def before_after_table(report: dict) -> str:
    """Per (mode, kind): each metric before -> after; then the held-out loss."""
    before, after = report["before"], report["after"]

    def pair(a: float | None, b: float | None) -> str:
        return "-" if a is None and b is None else f"{_fmt(a)} → {_fmt(b)}"

    lines = [f"before: {before.get('model')}", f"after:  {after.get('model')}", "",
             "| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join("---" for _ in TABLE_HEAD) + "|"]
    for mode, kinds in after["metrics"].items():
        for kind, m in kinds.items():
            b = before["metrics"][mode][kind]
            lines.append(f"| {mode} | {kind} | {m['n']} | " + " | ".join(
                pair(b[k], m[k]) for k in ("exact_match", "edit_similarity", "identifier_f1", "tests_pass")) + " |")
    lb, la = before.get("held_out_loss"), after.get("held_out_loss")
    if lb and la and lb["loss"] is not None and la["loss"] is not None:
        change = 100 * (la["loss"] - lb["loss"]) / lb["loss"]
        lines += ["", f"held-out loss (nats/token; {la['tokens']:,} tokens of {len(report['held_out_files'])} files, "
                      f"windows of {la['seq_len']}): {lb['loss']:.4f} → {la['loss']:.4f} ({change:+.1f}%); "
                      f"bits per byte {lb['bits_per_byte']:.4f} → {la['bits_per_byte']:.4f}"]
    return "\n".join(lines)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(records: list[dict]) -> dict:
    tested = [r["tests"] for r in records if "tests" in r]
    return {"n": len(records),
            "exact_match": _mean([float(r["exact_match"]) for r in records]),
            "edit_similarity": _mean([r["edit_similarity"] for r in records]),
            "identifier_f1": _mean([r["identifier_f1"] for r in records]),
            "tests_pass": _mean([float(s == "passed") for s in tested]) if tested else None,
            "tests_run": len(tested)}


def score(records: list[dict], settings: RepoBenchSettings) -> dict:
    """Mean metrics per mode and kind, and per mode over all kinds ("all")."""
    table: dict = {}
    for mode in settings.modes:
        mine = [r for r in records if r["mode"] == mode]
        table[mode] = {kind: _cell([r for r in mine if r["kind"] == kind]) for kind in settings.kinds}
        table[mode]["all"] = _cell(mine)
    return {"metrics": table, "num_records": len(records)}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown_table(report: dict) -> str:
    """One row per (mode, kind): n, exact match, edit similarity, identifier F1, tests passing."""
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join("---" for _ in TABLE_HEAD) + "|"]
    for mode, kinds in report["metrics"].items():
        for kind, m in kinds.items():
            tests = "-" if m["tests_pass"] is None else f"{m['tests_pass']:.3f} ({m['tests_run']})"
            lines.append(f"| {mode} | {kind} | {m['n']} | {_fmt(m['exact_match'])} | {_fmt(m['edit_similarity'])} | "
                         f"{_fmt(m['identifier_f1'])} | {tests} |")
    return "\n".join(lines)


def plot(reports: list[dict], path: str | Path) -> None:
    """Edit similarity and exact match per kind, one bar per mode; one row of panels per repository."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("edit_similarity", "edit similarity"), ("exact_match", "exact match"),
               ("identifier_f1", "identifier F1"))
    fig, axes = plt.subplots(len(reports), len(metrics), figsize=(4.2 * len(metrics), 3.2 * len(reports)),
                             squeeze=False)
    for row, report in zip(axes, reports):
        table = report["metrics"]
        modes = list(table)
        kinds = list(next(iter(table.values())))
        width = 0.8 / len(modes)
        for ax, (key, label) in zip(row, metrics):
            for i, mode in enumerate(modes):
                vals = [table[mode][k][key] or 0.0 for k in kinds]
                ax.bar([x + i * width for x in range(len(kinds))], vals, width, label=mode)
            ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(kinds))], kinds)
            ax.set_ylim(0, 1)
            ax.set_title(f"{report.get('repo_name', '')}: {label}", fontsize=9)
        row[0].legend(fontsize=7)
    _save(fig, path)


def plot_before_after(report: dict, path: str | Path) -> None:
    """One panel per metric: before and after bars side by side for each (mode, kind), and the loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = report["before"], report["after"]
    cells = [(m, k) for m, kinds in after["metrics"].items() for k in kinds]
    metrics = (("exact_match", "exact match"), ("edit_similarity", "edit similarity"), ("identifier_f1", "identifier F1"))
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.4))
    xs = range(len(cells))
    for ax, (key, label) in zip(axes, metrics):
        for shift, (run, name) in ((-0.2, (before, "before")), (0.2, (after, "after"))):
            ax.bar([x + shift for x in xs], [run["metrics"][m][k][key] or 0.0 for m, k in cells], 0.4, label=name)
        ax.set_xticks(list(xs), [f"{m}\n{k}" for m, k in cells], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{report['repo_name']}: {label}", fontsize=9)
    axes[0].legend(fontsize=7)
    losses = [run.get("held_out_loss") or {} for run in (before, after)]
    axes[-1].bar(["before", "after"], [lo.get("loss") or 0.0 for lo in losses], color=["tab:blue", "tab:orange"])
    axes[-1].set_title("held-out loss (nats/token)", fontsize=9)
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    """Write the figure atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


"""An on-disk, incrementally updated index of a repository's code chunks, with BM25 retrieval.

    index = RepoIndex.open("~/src/project")          # db: ~/src/project/.starcoder2/index.sqlite
    stats = index.update()                             # only new or changed files are re-chunked
    hits = index.search("parse_header(buf, offset)", k=8, exclude_path="pkg/reader.py")
    defs = index.definitions(["HeaderError", "parse_header"])

Files are those git would track (`git ls-files`, so `.gitignore` holds; every file below the root
outside a git work tree), filtered as the data pipeline does (data/ingest.py, data/filters.py,
data/language.py): known languages only, no vendored, binary, undecodable or oversized files.
A file is re-read only when its size or mtime changed, and re-chunked only when its content hash
changed. Chunks live in SQLite (schema versioned: a mismatching or foreign index is rebuilt, since it
is only a cache). BM25 (bm25s) runs over code-aware tokens: whole identifiers plus their
camelCase / snake_case parts, lower-cased, so `parseHeader`, `parse_header` and "header" meet.
The BM25 matrix is built in memory on the first search after the index changed.

Left out on purpose: embeddings (lexical retrieval is what editor clients ship and needs no model),
and watching the file system (callers call `update()`; it costs one stat per file when nothing changed).
"""

from __future__ import annotations

import functools
import hashlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from starcoder2.data.filters import decode_source
from starcoder2.data.ingest import repository_files
from starcoder2.data.language import is_vendor, language_of

from .chunk import Chunk, Snippet, chunk_file

SCHEMA_VERSION = 3
MAX_FILE_BYTES = 1 << 20  # as `data prepare`: larger files are generated or data, rarely useful context
# Languages that are data or prose rather than code: never indexed.
SKIP_LANGUAGES = frozenset({"JSON", "SVG", "XML", "Jupyter Notebook", "Text", "Roff"})

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
# Keywords and names so common in code that they only add noise to a query.
_STOPWORDS = frozenset(
    "a an and as async await break case catch class const continue def default del do elif else end enum export "
    "extends false final finally fn for from func function if impl import in is lambda let mut new nil none not "
    "null of or package pass pub public private protected raise return self static struct super switch the this "
    "throw throws true try use var void while with yield".split()
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL, sha1 TEXT NOT NULL,
    language TEXT, skipped TEXT);  -- skipped: why a file has no chunks ("binary", "undecodable"), else NULL
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL REFERENCES files(path) ON DELETE CASCADE,
    start_line INTEGER NOT NULL, end_line INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT, text TEXT NOT NULL,
    tokens TEXT NOT NULL);  -- code_tokens of path, name and text, space-separated: the BM25 document
CREATE INDEX IF NOT EXISTS chunks_path ON chunks(path);
CREATE INDEX IF NOT EXISTS chunks_name ON chunks(name);
"""


def code_tokens(text: str) -> list[str]:
    """Lower-cased identifiers and their camelCase / snake_case parts, stop words removed.

    "parseHTTPHeader(buf)" -> ["parsehttpheader", "parse", "http", "header", "buf"]
    """
    out = []
    for ident in _IDENTIFIER.findall(text):
        out += _identifier_tokens(ident)
    return out


@functools.lru_cache(maxsize=1 << 16)  # identifiers repeat a lot: this halves indexing time
def _identifier_tokens(ident: str) -> tuple[str, ...]:
    low = ident.lower()
    out = (low,) if len(low) > 1 and low not in _STOPWORDS else ()
    parts = _PARTS.findall(ident)
    if len(parts) > 1:
        out += tuple(p for p in map(str.lower, parts) if len(p) > 1 and p not in _STOPWORDS and not p.isdigit())
    return out


def _document_tokens(chunk: Chunk) -> list[str]:
    # The path and the name are part of the document: "config" finds config.py's chunks.
    return code_tokens(f"{chunk.path} {chunk.name or ''} {chunk.text}")


@dataclass
class UpdateStats:
    files: int = 0  # indexed files after the update
    chunks: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    skipped: int = 0  # listed files left out: unknown language, vendored, binary, too large
    languages: dict[str, int] = field(default_factory=dict)  # files per language
    seconds: float = 0.0

    def summary(self) -> str:
        langs = ", ".join(f"{k} {v}" for k, v in sorted(self.languages.items(), key=lambda kv: -kv[1]))
        return (f"{self.files} files, {self.chunks} chunks ({self.added} added, {self.changed} changed, "
                f"{self.removed} removed, {self.skipped} skipped) [{langs or 'no code'}] in {self.seconds:.2f} s")


class RepoIndex:
    """Chunks of one repository in SQLite; safe to share between threads (one lock guards it)."""

    def __init__(self, root: Path, conn: sqlite3.Connection, max_lines: int):
        self.root = root
        self.max_lines = max_lines
        self._conn = conn
        self._lock = threading.RLock()
        self._bm25: tuple[int, object, list[int]] | None = None  # (generation, retriever, chunk ids by row)

    @classmethod
    def open(cls, repo_root: str | Path, db_path: str | Path | None = None, *, max_lines: int = 60) -> RepoIndex:
        """Open (creating if needed) the index of `repo_root`; call `update()` to bring it up to date."""
        root = Path(repo_root).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"{repo_root}: not a directory")
        if db_path is None:
            db_dir = root / ".starcoder2"
            db_dir.mkdir(exist_ok=True)
            ignore = db_dir / ".gitignore"
            if not ignore.exists():  # keeps `git status` of the indexed repository clean
                ignore.write_text("*\n")
            db_path = db_dir / "index.sqlite"
        db_path = Path(db_path).expanduser()
        db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(db_path, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_mode = WAL")  # readers (a server) do not block a writer (`index`)
            index = cls(root, conn, max_lines)
            index._check_schema()
        except sqlite3.Error as e:  # e.g. --db names a file that is not an index
            raise OSError(f"{db_path}: cannot use as an index database ({e})") from None
        return index

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RepoIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ maintenance

    def _check_schema(self) -> None:
        """A database from another schema, root or chunk size is a stale cache: start it over."""
        expected = {"schema_version": str(SCHEMA_VERSION), "root": str(self.root), "max_lines": str(self.max_lines)}
        with self._lock, self._conn:
            self._conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            stored = dict(self._conn.execute("SELECT key, value FROM meta"))
            if any(stored.get(k) != v for k, v in expected.items()):
                self._conn.execute("DROP TABLE IF EXISTS chunks")
                self._conn.execute("DROP TABLE IF EXISTS files")
                self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", expected.items())
                self._bump_generation()
            self._conn.executescript(_SCHEMA)

    def _bump_generation(self) -> None:
        self._conn.execute("INSERT INTO meta VALUES ('generation', '1') ON CONFLICT(key) DO UPDATE "
                           "SET value = CAST(value AS INTEGER) + 1")

    def _generation(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def listed_files(self) -> list[str]:
        """Files `update()` considers, repository-relative: git's list (tracked and untracked, not ignored)
        inside a work tree, else every file outside hidden and cache directories."""
        return repository_files(self.root)

    def update(self, show_progress: bool = True) -> UpdateStats:
        """Re-chunk new and changed files, forget deleted ones; one transaction."""
        from tqdm import tqdm

        t0 = time.perf_counter()
        stats = UpdateStats()
        with self._lock:
            rows = self._conn.execute("SELECT path, mtime_ns, size, sha1, skipped FROM files")
            known = {row[0]: row[1:] for row in rows}
            seen: set[str] = set()
            with self._conn:
                for rel in tqdm(self.listed_files(), desc="indexing", unit="file", disable=not show_progress):
                    if self._update_file(rel, known.get(rel), stats):
                        seen.add(rel)
                gone = [p for p in known if p not in seen]
                self._conn.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in gone])
                stats.removed = len(gone)
                if stats.added or stats.changed or stats.removed:
                    self._bump_generation()
            stats.files, stats.chunks = self._conn.execute(
                "SELECT (SELECT COUNT(*) FROM files WHERE skipped IS NULL), (SELECT COUNT(*) FROM chunks)").fetchone()
            stats.languages = dict(self._conn.execute(
                "SELECT language, COUNT(*) FROM files WHERE skipped IS NULL GROUP BY language"))
        stats.seconds = time.perf_counter() - t0
        return stats

    def _update_file(self, rel: str, known: tuple | None, stats: UpdateStats) -> bool:
        """Bring one file up to date; True when its row stays (indexed, or remembered as undecodable).

        `known` is the file's stored (mtime_ns, size, sha1, skipped) row, or None for a new file.
        """
        path = self.root / rel
        language = language_of(rel)
        # A name that is not UTF-8 reaches us surrogate-escaped (not printable): SQLite cannot store it.
        if (language is None or language in SKIP_LANGUAGES or is_vendor(rel) or not rel.isprintable()
                or path.is_symlink() or not path.is_file()):
            stats.skipped += 1
            return False
        st = path.stat()
        if st.st_size > MAX_FILE_BYTES:
            stats.skipped += 1
            return False
        if known is not None and known[:2] == (st.st_mtime_ns, st.st_size):
            stats.skipped += known[3] is not None
            return True  # unchanged: not even read
        data = path.read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if known is not None and known[2] == digest:  # touched, not changed
            self._conn.execute("UPDATE files SET mtime_ns = ?, size = ? WHERE path = ?",
                               (st.st_mtime_ns, st.st_size, rel))
            stats.skipped += known[3] is not None
            return True
        text, reason = decode_source(data, MAX_FILE_BYTES)
        self._conn.execute("DELETE FROM chunks WHERE path = ?", (rel,))
        # Binary or undecodable files are remembered too, so that they are not read again until they change.
        self._conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                           (rel, st.st_mtime_ns, st.st_size, digest, language, reason))
        if text is not None:
            self._conn.executemany(
                "INSERT INTO chunks (path, start_line, end_line, kind, name, text, tokens) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(c.path, c.start_line, c.end_line, c.kind, c.name, c.text, " ".join(_document_tokens(c)))
                 for c in chunk_file(rel, text, language, max_lines=self.max_lines)])
        if text is None:
            stats.skipped += 1
            stats.changed += known is not None  # its old chunks are gone
        elif known is None:
            stats.added += 1
        else:
            stats.changed += 1
        return True

    # ------------------------------------------------------------------ queries

    def files(self) -> list[str]:
        """Indexed files, repository-relative, sorted."""
        with self._lock:
            return [p for (p,) in self._conn.execute("SELECT path FROM files WHERE skipped IS NULL ORDER BY path")]

    def chunks(self, path: str | None = None) -> list[Chunk]:
        """Every chunk (of one file when `path` is given), in file and line order."""
        sql = "SELECT path, start_line, end_line, kind, name, text FROM chunks"
        with self._lock:
            rows = (self._conn.execute(sql + " WHERE path = ? ORDER BY start_line", (path,)) if path is not None
                    else self._conn.execute(sql + " ORDER BY path, start_line"))
            return [Chunk(*row) for row in rows]

    def read(self, path: str) -> str:
        """The current text of an indexed file (from disk)."""
        if path not in set(self.files()):
            raise FileNotFoundError(f"{path} is not an indexed file of {self.root}")
        return (self.root / path).read_text(encoding="utf-8", errors="replace")

    def definitions(self, names: Iterable[str]) -> list[Snippet]:
        """Function and class chunks defining one of `names`, in the order of `names` (then path)."""
        order = {n: i for i, n in enumerate(dict.fromkeys(names))}
        if not order:
            return []
        rows = []
        with self._lock:
            todo = list(order)
            for i in range(0, len(todo), 500):  # SQLite caps the number of bound parameters
                batch = todo[i : i + 500]
                rows += self._conn.execute(
                    "SELECT path, start_line, end_line, kind, name, text FROM chunks "
                    f"WHERE kind IN ('function', 'class') AND name IN ({','.join('?' * len(batch))})", batch).fetchall()
        rows.sort(key=lambda r: (order[r[4]], r[0], r[1]))
        return [Snippet(*row) for row in rows]

    def search(self, query: str, k: int = 8, *, exclude_path: str | None = None) -> list[Snippet]:
        """The `k` chunks scoring highest for `query` under BM25 (score > 0 only), best first."""
        import numpy as np

        tokens = code_tokens(query)
        if not tokens or k <= 0:
            return []
        with self._lock:
            retriever, ids = self._retriever()
            if retriever is None:
                return []
            scores = retriever.get_scores(tokens)  # (n_chunks,); out-of-vocabulary tokens are ignored
            order = np.argsort(-scores, kind="stable")
            hits = []
            for row in order:
                if scores[row] <= 0 or len(hits) == k:
                    break
                chunk = self._conn.execute("SELECT path, start_line, end_line, kind, name, text FROM chunks "
                                           "WHERE id = ?", (ids[row],)).fetchone()
                if chunk is not None and chunk[0] != exclude_path:
                    hits.append(Snippet(*chunk, score=float(scores[row])))
            return hits

    def _retriever(self):
        """The BM25 retriever over all chunks, rebuilt when the index changed since the last build."""
        generation = self._generation()
        if self._bm25 is None or self._bm25[0] != generation:
            import bm25s

            rows = self._conn.execute("SELECT id, tokens FROM chunks ORDER BY id").fetchall()
            retriever = None
            if rows:
                corpus = [tokens.split() for _, tokens in rows]
                retriever = bm25s.BM25()
                retriever.index(corpus, show_progress=False)
            self._bm25 = (generation, retriever, [r[0] for r in rows])
        return self._bm25[1], self._bm25[2]

"""Ingest: directories, git repositories, single files and JSONL into `Document`s (reference §3.1).

A directory is one repository (named after it); inside a git work tree the files are those git
would track (`git ls-files`, so `.gitignore` is respected), elsewhere every file below it except
hidden and cache directories. A JSONL file holds one file per line (`content` or `text`, `path`,
`repo` or `repo_name`, optional `licence`/`stars`/...), grouped into repositories by `repo`. Files
that are too large, binary or undecodable are reported with a reason and never read twice.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from fnmatch import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .document import Document
from .filters import decode_source
from .language import is_vendor, language_of
from .licence import is_licence_file

_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".mypy_cache", ".pytest_cache", ".tox", ".venv", "node_modules"}


@dataclass
class Repository:
    name: str
    docs: list[Document] = field(default_factory=list)
    dropped: list[tuple[str, str, int]] = field(default_factory=list)  # (path, reason, bytes)


def _git_files(root: Path) -> list[str] | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted(p for p in out.decode("utf-8", "surrogateescape").split("\0") if p)


def _walk_files(root: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        files += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(files)


def repository_files(root: Path) -> list[str]:
    """Repository-relative paths of `root`: git's list (tracked and untracked, not ignored) inside a
    work tree, else every file outside hidden and cache directories."""
    files = _git_files(root) if (root / ".git").exists() else None
    return files if files is not None else _walk_files(root)


def _add(repo: Repository, path: str, data: bytes | None, size: int, max_bytes: int, meta: dict) -> None:
    if data is None or size > max_bytes:
        repo.dropped.append((path, "too_large", size))
        return
    text, reason = decode_source(data, max_bytes)
    if text is None:
        repo.dropped.append((path, reason, size))
        return
    language = language_of(path, text)
    if language is None and not is_licence_file(path):  # keep only code we know, and licence texts
        repo.dropped.append((path, "no_language", size))
        return
    if is_vendor(path):
        repo.dropped.append((path, "vendor", size))
        return
    repo.docs.append(Document(text=text, repo=repo.name, path=path, language=language, meta=meta))


def excluded(rel: str, exclude: tuple[str, ...]) -> bool:
    """`rel` matches a glob in `exclude`, or lies below a directory that does ("site-packages")."""
    parts = rel.split("/")
    return any(fnmatch(rel, g) or any(fnmatch(p, g) for p in parts[:-1]) for g in exclude)


def read_directory(root: Path, max_bytes: int, name: str | None = None, exclude: tuple[str, ...] = ()) -> Repository:
    root = Path(root)
    repo = Repository(name or root.resolve().name)
    for rel in repository_files(root):
        if excluded(rel, exclude):
            continue
        path = root / rel
        if not path.is_file() or path.is_symlink():
            continue
        size = path.stat().st_size
        _add(repo, rel, path.read_bytes() if size <= max_bytes else None, size, max_bytes, {})
    return repo


def read_jsonl(path: Path, max_bytes: int) -> list[Repository]:
    repos: dict[str, Repository] = {}
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row.get("content", row.get("text"))
                file_path = row.get("path") or row.get("max_stars_repo_path") or f"file_{n}"
                repo_name = row.get("repo") or row.get("repo_name") or row.get("max_stars_repo_name") or path.stem
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: not a JSON object per line ({e})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: needs a string `content` or `text` field")
            repo = repos.setdefault(repo_name, Repository(repo_name))
            meta = {k: row[k] for k in ("stars", "forks", "licence", "license") if k in row}
            data = text.encode("utf-8", "surrogatepass")
            _add(repo, file_path, data, len(data), max_bytes, meta)
    return list(repos.values())


def read_sources(sources: list[str | Path], max_bytes: int, exclude: tuple[str, ...] = ()) -> Iterator[Repository]:
    """Every repository in `sources`, in the order given; a single file joins its parent's repository."""
    loose: dict[Path, list[Path]] = {}
    for src in map(Path, sources):
        if src.is_dir():
            yield read_directory(src, max_bytes, exclude=exclude)
        elif src.name.endswith((".jsonl", ".jsonl.gz")):
            yield from read_jsonl(src, max_bytes)
        elif src.is_file():
            loose.setdefault(src.parent, []).append(src)
        else:
            raise FileNotFoundError(f"{src}: no such file or directory")
    for parent, files in loose.items():
        repo = Repository(parent.resolve().name)
        for f in files:
            size = f.stat().st_size
            _add(repo, f.name, f.read_bytes() if size <= max_bytes else None, size, max_bytes, {})
        yield repo

"""The repository a server completes in (`starcoder2 serve --repo PATH`): its index, kept fresh, and
the repository-format prompts built from it.

At start the index is opened and brought up to date (a tqdm bar on stderr, the server's log). A
daemon thread then calls `RepoIndex.update()` every `refresh_s` seconds: an update stats every
file and re-reads only those whose size or mtime changed, so polling costs little, and a request
never pays for it (polling was chosen over a per-request mtime check for that reason; an edit
shows up within `refresh_s`). The index is thread-safe (one lock), so requests search it from a
worker thread (`asyncio.to_thread`), waiting at most for a running update.

A prompt for a cursor (`prompt`) takes, in the assembler's priority order (repo/context.py), the
client's declarations and the definitions of the names the file imports, then the client's
snippets and the retrieved ones, in StarCoder2's native repository format. Client-sent context is
used as sent; retrieval skips the current file (its prefix and suffix are already in the prompt).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from ..data.language import language_of
from ..repo import Assembled, RepoIndex, Snippet, assemble, imported_names, query_for_cursor
from ..tokenizer import Tokenizer

log = logging.getLogger("starcoder2.server")

RETRIEVED_SNIPPETS = 8


def client_snippet(path: str, text: str, score: float = float("inf")) -> Snippet:
    """A context chunk sent by a client (llama.cpp `input_extra`, Tabby `segments`) as a Snippet.
    The infinite score ranks client chunks above retrieved ones, in the client's order."""
    return Snippet(path, 1, text.count("\n") + 1, "block", None, text, score=score)


class RepoContext:
    def __init__(self, root: str | Path, refresh_s: float = 2.0, show_progress: bool = True):
        if refresh_s <= 0:
            raise ValueError(f"the repository refresh interval must be > 0 s, got {refresh_s}")
        self.index = RepoIndex.open(root)
        stats = self.index.update(show_progress=show_progress)
        log.info("repository %s indexed: %s", self.index.root, stats.summary())
        self.name = self.index.root.name
        self.refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="starcoder2-repo-index", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                stats = self.index.update(show_progress=False)
                if stats.added or stats.changed or stats.removed:
                    log.info("repository index refreshed: %s", stats.summary())
            except Exception:  # a file vanishing mid-scan, a locked database: try again next time
                log.exception("repository index refresh failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.refresh_s + 5)
        self.index.close()

    def prompt(self, tok: Tokenizer, *, path: str | None, prefix: str, suffix: str, budget: int,
               snippets: Sequence[Snippet] = (), declarations: Sequence[Snippet] = ()) -> Assembled:
        """The native-format prompt for a cursor in `path` (None: a file the client did not name)."""
        current = self.relative(path)
        query = query_for_cursor(prefix, suffix)
        found = self.index.search(query, k=RETRIEVED_SNIPPETS, exclude_path=current)
        # llama.cpp clients name no current file: Python's import syntax is then tried (no match elsewhere).
        language = language_of(current) if current else "Python"
        definitions = self.index.definitions(imported_names(prefix, language))
        return assemble(tok, path=current, prefix=prefix, suffix=suffix, snippets=[*snippets, *found],
                        definitions=[*declarations, *definitions], style="native", budget=budget,
                        repo_name=self.name)

    def relative(self, path: str | None) -> str:
        """A client's file path relative to the repository root (editors may send absolute ones)."""
        if not path:
            return ""
        p = Path(path)
        if p.is_absolute():
            try:
                return p.resolve().relative_to(self.index.root).as_posix()
            except ValueError:
                return path
        return p.as_posix()

    async def aprompt(self, tok: Tokenizer, **kw) -> Assembled:
        return await asyncio.to_thread(self.prompt, tok, **kw)

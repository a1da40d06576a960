"""Repository-aware completion: index a git repository, retrieve snippets and definitions for a
cursor, assemble them into a prompt within a token budget, and post-process editor completions.

    from starcoder2.repo import RepoIndex, assemble, postprocess
    index = RepoIndex.open("path/to/repo"); index.update()
    hits = index.search("def parse_header", k=8, exclude_path="pkg/cli.py")
"""

from .chunk import Chunk, Snippet, chunk_file
from .context import Assembled, ContextConfig, Part, assemble, build_context, imported_names, query_for_cursor
from .index import RepoIndex, UpdateStats, code_tokens
from .postprocess import postprocess

__all__ = [
    "Assembled", "Chunk", "ContextConfig", "Part", "RepoIndex", "Snippet", "UpdateStats", "assemble", "build_context",
    "chunk_file", "code_tokens", "imported_names", "postprocess", "query_for_cursor",
]

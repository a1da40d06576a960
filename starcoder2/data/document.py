"""The unit every data stage consumes and produces: one source file with its provenance."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, kw_only=True)
class Document:
    text: str
    repo: str  # repository name ("owner/name" or a directory name); files of one repo form one document
    path: str  # POSIX path inside the repository
    language: str | None = None  # from the file name (language.py); None: not code we know
    licence: str = ""  # SPDX ids of the licences that apply, joined by " AND "; "" when none found
    licence_type: str = "no_license"  # permissive | no_license | non_permissive (licence.py)
    meta: dict = field(default_factory=dict)  # free-form provenance (stars, source, ...)

    @property
    def sha1(self) -> str:
        """Content key of exact dedup (the Stack's blob_id is the git blob sha1; plain sha1 is enough)."""
        return hashlib.sha1(self.text.encode("utf-8", "surrogatepass")).hexdigest()

    def with_(self, **changes) -> Document:
        return replace(self, **changes)

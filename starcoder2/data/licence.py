"""Licence detection and classification for the files of one repository (data-pipeline.md §3.3).

    docs = assign_licences(repo_docs)            # sets Document.licence / .licence_type
    docs = [d for d in docs if keep_licence(d) is None]

Steps, as in the Stack v2: find licence files by name (go-license-detector's idea: a licence word as
the whole base name or a delimited part of it), detect the licences in them, propagate each one to
every file in the same directory and below, add the file's own `SPDX-License-Identifier` header, and
classify the union as permissive / no_license / non_permissive.

Deliberately left out: ScanCode-level matching. `detect_licences` is a small curated matcher of
distinctive phrases for about twenty common licences; it does not score partial or modified texts,
find licences in READMEs or code comments (apart from SPDX headers), or report CLAs, exceptions or
unknown references. There is no GitHub API licence here, so "nothing detected" means no_license.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable

from starcoder2.data.document import Document

PERMISSIVE: frozenset[str] = frozenset({
    "0BSD", "Apache-1.1", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "BSD-3-Clause-Clear",
    "BSD-4-Clause", "BSL-1.0", "CC-BY-4.0", "CC0-1.0", "ISC", "MIT", "MIT-0", "NCSA", "PostgreSQL",
    "PSF-2.0", "Python-2.0", "Unicode-DFS-2016", "Unlicense", "UPL-1.0", "WTFPL", "X11", "Zlib",
})

# File names: a licence word as the whole base name or a part delimited by - _ . or space
# (LICENSE, LICENSE.md, COPYING.LESSER, LICENSE-MIT, MIT-LICENSE). NOTICE holds attributions, not
# licence terms, so it is left out; so are source files that merely have such a name (licence.py).
_LICENCE_WORDS = frozenset({"license", "licence", "licenses", "licences", "copying", "unlicense"})
_CODE_EXTENSIONS = frozenset({
    "py", "pyc", "ipynb", "js", "mjs", "ts", "tsx", "jsx", "go", "rs", "java", "kt", "scala", "c",
    "h", "cc", "cpp", "hpp", "cs", "rb", "php", "swift", "sh", "json", "yml", "yaml", "toml", "xml",
    "css", "scss", "vue", "lua", "pl", "r", "dart", "sql", "svg", "png", "jpg", "gif",
})

# Phrases are matched on normalised text: lower case, every run of non-alphanumerics one space
# ("Version 2.0," -> "version 2 0", "and/or" -> "and or"), so line wrapping and punctuation vary freely.
_PHRASES: tuple[tuple[str, str], ...] = (
    ("MIT", r"permission is hereby granted free of charge to any person obtaining a copy"),
    ("Apache-2.0", r"apache license version 2 0"),
    ("ISC", r"permission to use copy modify and (?:or )?distribute this software for any purpose "
            r"with or without fee is hereby granted provided that the above copyright notice"),
    ("0BSD", r"permission to use copy modify and (?:or )?distribute this software for any purpose "
             r"with or without fee is hereby granted (?!provided)"),
    ("Unlicense", r"this is free and unencumbered software released into the public domain"),
    ("CC0-1.0", r"\bcc0 1 0\b|creative commons legal code cc0|publicdomain zero 1 0"),
    ("Zlib", r"the origin of this software must not be misrepresented"),
    ("PSF-2.0", r"license agreement is between the python software foundation|psf license agreement"),
    ("Python-2.0", r"beopen python open source license agreement"),
    ("BSL-1.0", r"boost software license (?:version )?1 0|permission is hereby granted free of charge "
                r"to any person or organization obtaining a copy of the software and accompanying"),
    ("MPL-2.0", r"mozilla public license (?:version |v )?2 0"),
    ("EPL-2.0", r"eclipse public license (?:version |v )?2 0"),
)
_BSD = r"redistribution and use in source and binary forms with or without modification are permitted"
_BSD_NAME_CLAUSE = r"neither the name|may not be used to endorse or promote"  # the third clause
_BSD_ADVERTISING = r"all advertising materials mentioning features"  # the fourth clause

# GNU family: "GNU <kind> General Public License" with a version right after the name, either in the
# title ("Version 3, 29 June 2007") or in the notice ("as published by the FSF; either version 2").
_GNU = re.compile(
    r"gnu (affero |lesser |library |)general public license"
    r"(?: as published by the free software foundation)?(?: either)? (?:version |v ?)(2 1|2|3)\b"
)
_GNU_IDS = {("", "2"): "GPL-2.0", ("", "3"): "GPL-3.0", ("lesser ", "2 1"): "LGPL-2.1",
            ("library ", "2"): "LGPL-2.0", ("lesser ", "3"): "LGPL-3.0", ("affero ", "3"): "AGPL-3.0"}
# Passages that name a GNU licence without granting it: MPL-2.0's / EPL-2.0's "Secondary License"
# definition and LGPL-2.1's option to use "the ordinary GNU General Public License, version 2".
_GNU_MENTIONS = re.compile(
    r"secondary licenses? means .{0,300}? or any later versions? of th(?:ose licenses|at license)"
    r"|ordinary gnu general public license"
)

_SPDX_HEADER = re.compile(r"SPDX-License-Identifier:\s*([^\n]*)", re.IGNORECASE)
_SPDX_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+:-]*")
_HEADER_LINES = 30
_MAX_LICENCE_CHARS = 200_000  # licence texts are short; cap the cost of a mis-named huge file
_CANONICAL = {i.lower(): i for i in PERMISSIVE | {i for i, _ in _PHRASES} | set(_GNU_IDS.values())}


def is_licence_file(path: str) -> bool:
    """True for licence-like base names (LICENSE, COPYING.LESSER, LICENSE-MIT, UNLICENSE, ...)."""
    name = posixpath.basename(path).lower()
    extension = name.rsplit(".", 1)[1] if "." in name.lstrip(".") else ""
    if extension in _CODE_EXTENSIONS:
        return False
    return any(part in _LICENCE_WORDS for part in re.split(r"[-_. ]", name))


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text[:_MAX_LICENCE_CHARS].lower()))


def detect_licences(text: str) -> list[str]:
    """Sorted SPDX ids of the licences whose distinctive phrases appear in a licence text."""
    norm = _normalise(text)
    found = {spdx for spdx, phrase in _PHRASES if re.search(phrase, norm)}
    if re.search(_BSD, norm):
        if re.search(_BSD_ADVERTISING, norm):
            found.add("BSD-4-Clause")
        elif re.search(_BSD_NAME_CLAUSE, norm):
            found.add("BSD-3-Clause")
        else:
            found.add("BSD-2-Clause")
    for match in _GNU.finditer(_GNU_MENTIONS.sub(" ", norm)):
        if spdx := _GNU_IDS.get(match.groups()):
            found.add(spdx)
    return sorted(found)


def detect_header_licence(text: str) -> list[str]:
    """Sorted SPDX ids from `SPDX-License-Identifier:` lines in the first 30 lines of a file.

    Operators (AND, OR) and exceptions (`WITH LLVM-exception`) are dropped: both sides of an OR are
    kept, so a dual licence with a non-permissive side classifies as non_permissive, as ScanCode's
    expressions did in the Stack.
    """
    head = "\n".join(text.splitlines()[:_HEADER_LINES])
    found = set()
    for expression in _SPDX_HEADER.findall(head):
        tokens = [t.rstrip(".") for t in _SPDX_TOKEN.findall(expression)]
        for prev, token in zip([""] + tokens, tokens):
            if token.upper() in ("AND", "OR", "WITH") or prev.upper() == "WITH":
                continue
            found.add(_CANONICAL.get(token.lower(), token))
    return sorted(found)


def classify(spdx_ids: Iterable[str]) -> str:
    """permissive | no_license | non_permissive, by the §3.3 decision table without a GitHub licence."""
    ids = {i for i in spdx_ids if i}
    if not ids:
        return "no_license"
    return "permissive" if ids <= PERMISSIVE else "non_permissive"


def assign_licences(docs: list[Document]) -> list[Document]:
    """Set `licence` and `licence_type` on the files of ONE repository.

    A licence found in `d/LICENSE` applies to every file under `d/` (a root licence to all files);
    each file also gets the ids of its own SPDX header. Licence files stay in the list.
    """
    by_prefix: dict[str, set[str]] = {}
    for doc in docs:
        if is_licence_file(doc.path):
            directory = posixpath.dirname(doc.path.lstrip("/").removeprefix("./"))
            prefix = directory + "/" if directory else ""
            by_prefix.setdefault(prefix, set()).update(detect_licences(doc.text))
    out = []
    for doc in docs:
        path = doc.path.lstrip("/").removeprefix("./")
        ids = set(detect_header_licence(doc.text))
        for prefix, found in by_prefix.items():
            if path.startswith(prefix):
                ids |= found
        out.append(doc.with_(licence=" AND ".join(sorted(ids)), licence_type=classify(ids)))
    return out


def keep_licence(doc: Document) -> str | None:
    """None to keep the file (permissive or no_license), else the drop reason."""
    if doc.licence_type in ("permissive", "no_license"):
        return None
    return f"licence:{doc.licence_type}"

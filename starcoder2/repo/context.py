"""Context assembly for a cursor: the current file's prefix and suffix plus repository context,
rendered in one of four styles and fitted to a token budget.

Styles (every one ends in PSM fill-in-the-middle on the current file, reference §7.1, §7.4):

    none, file  <fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>                  (no context; aliases)
    commented   <fim_prefix># Path: other.py\\n# {line}\\n...# Path: {path}\\n{prefix}<fim_suffix>...
                (the comment style of editor clients: Tabby, llm-ls/Copilot; `//` or `--` where fitting)
    native      <repo_name>{name}<file_sep>{other.py}\\n{code}...<file_sep><fim_prefix>{path}\\n{prefix}
                <fim_suffix>{suffix}<fim_middle>       (StarCoder2's repository format, as in training §7.3)

Budget (exact, counted in ids): sentinels, repository name and path lines are fixed costs. The
current file is guaranteed `file_share` of the rest (its prefix tail and suffix head, cut as
prompts.fim_prompt does: the prefix keeps at least 3/4); context then fills what is left in priority
order: definitions of imported names (in the order given, nearest use first), retrieved snippets by
score, recent files (their head when the whole file does not fit); whatever context leaves unused
goes back to the current file. Snippets of one file are merged by line number into one section, so
an overlapping definition and snippet cost their union once. Sections are placed farthest-priority
first, so the most relevant code sits right before the current file. Snippets of the current file
itself are dropped: the prefix and suffix already hold it.

Every text piece is encoded on its own (as prompts.py does), so code cannot inject control tokens
and the length of the result is the sum of the pieces' lengths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starcoder2.data.language import language_of
from starcoder2.prompts import _fim_ids, _fit_prefix_suffix, _require
from starcoder2.tokenizer import Tokenizer

from .chunk import Snippet, language_key

if TYPE_CHECKING:
    from .index import RepoIndex

STYLES = ("none", "file", "commented", "native")
_HASH_COMMENT = {"Python", "Shell", "Ruby", "Perl", "R", "Julia", "YAML", "TOML", "Makefile", "Dockerfile", "CMake",
                 "Elixir", "PowerShell", "Nim", "INI"}
_DASH_COMMENT = {"SQL", "Lua", "Haskell"}


@dataclass(kw_only=True)
class ContextConfig:
    """How much context to gather and how to render it (used by `build_context`)."""

    budget: int = 4096  # prompt tokens, sentinels included
    max_snippets: int = 8  # retrieved chunks offered to the assembler
    include_definitions: bool = True  # definitions of the names the current file imports
    include_recent: bool = True  # recently edited files the caller passes
    style: str = "native"
    file_share: float = 0.5  # part of the budget the current file is guaranteed
    query_lines: int = 20  # prefix lines around the cursor used as the retrieval query

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"unknown context style {self.style!r}; expected one of {STYLES}")
        if self.budget < 8:
            raise ValueError(f"budget={self.budget} is too small for a prompt")
        if not 0.0 <= self.file_share <= 1.0:
            raise ValueError(f"file_share={self.file_share} must lie in [0, 1]")


@dataclass(frozen=True)
class Part:
    """One piece of context offered to the assembler."""

    kind: str  # "definition" | "snippet" | "recent"
    path: str
    start_line: int
    end_line: int
    tokens: int = 0  # what including it cost (0: already covered by other parts of its file)
    reason: str = ""  # why it was dropped: "budget" | "current_file"


@dataclass
class Assembled:
    ids: list[int]
    text: str  # the prompt decoded with special tokens, for debugging and logs
    included: list[Part] = field(default_factory=list)
    dropped: list[Part] = field(default_factory=list)
    prefix_tokens: int = 0  # of the current file's prefix that made it in
    suffix_tokens: int = 0
    truncated: bool = False  # the prefix or the suffix was cut


@dataclass
class _Item:
    kind: str
    path: str
    start_line: int
    lines: list[str]


def assemble(
    tok: Tokenizer,
    *,
    path: str,
    prefix: str,
    suffix: str,
    snippets: Sequence[Snippet] = (),
    definitions: Sequence[Snippet] = (),
    recent: Sequence[tuple[str, str]] = (),
    style: str = "native",
    budget: int = 4096,
    repo_name: str | None = None,
    file_share: float = 0.5,
) -> Assembled:
    """A prompt of at most `budget` ids for completing `path` between `prefix` and `suffix`.

    `recent` holds (path, text) of recently edited files; repo_name=None leaves out `<repo_name>`
    (native style); path="" (a client that names no file) leaves out the current file's path line.
    Raises ValueError when the budget cannot hold the fixed tokens.
    """
    if style not in STYLES:
        raise ValueError(f"unknown context style {style!r}; expected one of {STYLES}")
    pre, mid, suf = _fim_ids(tok)
    prefix_ids, suffix_ids = tok.encode(prefix), tok.encode(suffix)
    with_context = style in ("commented", "native")
    if style == "native":
        head = [] if repo_name is None else [_require(tok, "<repo_name>"), *tok.encode(repo_name)]
        file_sep = _require(tok, "<file_sep>")
        path_text = f"{path}\n" if path else ""
        path_ids = tok.encode(path_text) if path_text else []
        fixed = len(head) + 1 + len(path_ids) + 3  # head, <file_sep>, path line, 3 FIM sentinels
    else:
        head, file_sep = [], None
        path_text = f"{_comment_marker(path)} Path: {path}\n" if with_context and path else ""
        path_ids = tok.encode(path_text) if path_text else []
        fixed = len(path_ids) + 3
    available = budget - fixed
    if available < 0:
        raise ValueError(f"budget={budget} cannot hold the prompt's fixed tokens ({fixed}: sentinels, names, path)")

    items = _ordered_items(path, snippets, definitions, recent) if with_context else []
    file_tokens = len(prefix_ids) + len(suffix_ids)
    context_room = available - min(file_tokens, int(available * file_share))

    def render(other: str, body: str) -> list[int]:  # one context section, as it will appear in the prompt
        if style == "native":
            return [file_sep, *tok.encode(f"{other}\n{body}\n")]
        return tok.encode(_commented(path, other, body))

    sections, included, dropped = _fill(items, path, context_room, render)
    context_ids = [t for ids in sections for t in ids]

    kept_prefix, kept_suffix = _fit_prefix_suffix(tok, prefix_ids, suffix_ids, available - len(context_ids), budget)
    current = path_ids + kept_prefix
    if path_ids and len(kept_prefix) == len(prefix_ids):
        # A whole prefix is encoded with its path line as one piece, as in training (and repo_prompt);
        # the path line is apart only when the prefix is cut from the left.
        joint = tok.encode(path_text + prefix)
        current = joint if len(joint) <= len(current) else current
    if style == "native":
        ids = [*head, *context_ids, file_sep, pre, *current, suf, *kept_suffix, mid]
    else:
        ids = [pre, *context_ids, *current, suf, *kept_suffix, mid]
    assert len(ids) <= budget, (len(ids), budget)  # by construction; a bug otherwise
    return Assembled(ids=ids, text=tok.decode(ids, skip_special=False), included=included, dropped=dropped,
                     prefix_tokens=len(kept_prefix), suffix_tokens=len(kept_suffix),
                     truncated=len(kept_prefix) < len(prefix_ids) or len(kept_suffix) < len(suffix_ids))


def _ordered_items(path, snippets, definitions, recent) -> list[_Item]:
    """Context in priority order: definitions (as given), snippets by score, recent files (as given)."""
    ranked = sorted(snippets, key=lambda s: -s.score)  # stable: equal scores keep the caller's order
    items = [_Item("definition", d.path, d.start_line, d.text.split("\n")) for d in definitions]
    items += [_Item("snippet", s.path, s.start_line, s.text.split("\n")) for s in ranked]
    items += [_Item("recent", p, 1, text.rstrip("\n").split("\n")) for p, text in recent]
    return items


def _fill(items: list[_Item], path: str, room: int, render):
    """Greedily add items that fit in `room` tokens; returns (section ids in prompt order, included, dropped)."""
    files: dict[str, dict[int, str]] = {}  # path -> {line number: text}, merged across items
    cost: dict[str, int] = {}  # path -> tokens of its rendered section
    rank: dict[str, int] = {}  # path -> priority of its best item (0 = highest)
    used = 0
    included, dropped = [], []
    for n, item in enumerate(items):
        end_line = item.start_line + len(item.lines) - 1
        if item.path == path:
            dropped.append(Part(item.kind, item.path, item.start_line, end_line, reason="current_file"))
            continue
        lines = files.get(item.path, {})
        take = len(item.lines)
        candidate = _merge(lines, item.start_line, item.lines[:take])
        new_cost = len(render(item.path, _body(candidate)))
        if used + new_cost - cost.get(item.path, 0) > room and item.kind == "recent":
            take = _longest_head(item, lines, room - used + cost.get(item.path, 0), render)
            candidate = _merge(lines, item.start_line, item.lines[:take])
            new_cost = len(render(item.path, _body(candidate))) if take else 0
        delta = new_cost - cost.get(item.path, 0)
        if take == 0 or used + delta > room:
            dropped.append(Part(item.kind, item.path, item.start_line, end_line, reason="budget"))
            continue
        files[item.path], cost[item.path] = candidate, new_cost
        rank.setdefault(item.path, n)
        used += delta
        included.append(Part(item.kind, item.path, item.start_line, item.start_line + take - 1, tokens=delta))
    # Farthest priority first: the best context ends right before the current file.
    order = sorted(files, key=lambda p: -rank[p])
    return [render(p, _body(files[p])) for p in order], included, dropped


def _merge(lines: dict[int, str], start: int, new: list[str]) -> dict[int, str]:
    merged = dict(lines)
    merged.update((start + i, text) for i, text in enumerate(new))
    return merged


def _body(lines: dict[int, str]) -> str:
    """Lines in order; a blank line marks a gap between non-adjacent runs."""
    out, previous = [], None
    for number in sorted(lines):
        if previous is not None and number != previous + 1:
            out.append("")
        out.append(lines[number])
        previous = number
    return "\n".join(out)


def _longest_head(item: _Item, lines: dict[int, str], room: int, render) -> int:
    """How many leading lines of a recent file fit in `room` tokens (binary search; 0 if none)."""
    lo, hi = 0, len(item.lines)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(render(item.path, _body(_merge(lines, item.start_line, item.lines[:mid])))) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _comment_marker(path: str) -> str:
    language = language_of(path)
    return "#" if language in _HASH_COMMENT else "--" if language in _DASH_COMMENT else "//"


def _commented(current_path: str, path: str, body: str) -> str:
    """`# Path: other.py` then every line of `body` as a comment, in the current file's syntax."""
    c = _comment_marker(current_path)
    return f"{c} Path: {path}\n" + "".join(f"{c} {line}\n" if line else f"{c}\n" for line in body.split("\n"))


# ---------------------------------------------------------------------------- what to retrieve


def query_for_cursor(prefix: str, suffix: str, lines: int = 20, suffix_lines: int = 5) -> str:
    """The retrieval query: the last `lines` lines before the cursor and the first `suffix_lines` after."""
    before = prefix.split("\n")[-lines:] if lines > 0 else []
    after = suffix.split("\n")[:suffix_lines] if suffix_lines > 0 else []
    return "\n".join(before + after)


_PY_FROM = re.compile(r"^\s*from\s+[.\w]+\s+import\s+(\([^)]*\)|[^\n#]+)", re.MULTILINE)
_PY_IMPORT = re.compile(r"^\s*import\s+([^\n#]+)", re.MULTILINE)
_JS_IMPORT = re.compile(r"\bimport\s+(?:type\s+)?([^;'\"]+?)\s+from\s*['\"]")
_JS_REQUIRE = re.compile(r"\b(?:const|let|var)\s+(\{[^}]*\}|[\w$]+)\s*=\s*require\s*\(")
_GO_IMPORT = re.compile(r"\bimport\s*(\([^)]*\)|[^\n]+)")
_GO_SPEC = re.compile(r"(?:([\w.]+)\s+)?\"([^\"]+)\"")
_JAVA_IMPORT = re.compile(r"^\s*import\s+(?:static\s+)?([\w.]+)\s*;", re.MULTILINE)
_RUST_USE = re.compile(r"^\s*(?:pub\s+)?use\s+([^;]+);", re.MULTILINE)
_C_CALL = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
_C_NOT_CALLS = {"if", "for", "while", "switch", "return", "sizeof", "defined", "catch", "alignof", "typeof"}


def imported_names(prefix: str, language: str | None) -> list[str]:
    """Names the code before the cursor takes from other modules, most recently used first.

    Python `from m import a, b as c` -> a, b; `import m` (or `as n`) -> the attributes used as
    `m.x`. JavaScript/TypeScript: named, default and `require` imports, and `ns.x` for namespace
    imports. Go: `pkg.Exported` for imported packages. Java: the imported class or static member.
    Rust: the leaves of `use` trees. C/C++ have no imports of names: the functions called.
    """
    key = language_key(language)
    names, modules = [], []
    if key == "python":
        for clause in _PY_FROM.findall(prefix):
            names += [_before_as(n) for n in clause.strip("() \n").replace("\n", " ").split(",")]
        for clause in _PY_IMPORT.findall(prefix):
            modules += [n.split(" as ")[-1].strip() for n in clause.split(",")]
    elif key in ("javascript", "typescript", "tsx"):
        for clause in _JS_IMPORT.findall(prefix) + _JS_REQUIRE.findall(prefix):
            braces = re.search(r"\{([^}]*)\}", clause)
            if braces:
                names += [_before_as(n.split(":")[0]) for n in braces.group(1).split(",")]
            outside = re.sub(r"\{[^}]*\}", "", clause)
            namespace = re.search(r"\*\s*as\s+([\w$]+)", outside)
            if namespace:
                modules.append(namespace.group(1))
            names += [n.strip() for n in re.sub(r"\*\s*as\s+[\w$]+", "", outside).split(",")]
            modules += [n.strip() for n in outside.split(",") if re.fullmatch(r"\s*[\w$]+\s*", n)]
    elif key == "go":
        for clause in _GO_IMPORT.findall(prefix):
            modules += [alias or path.rsplit("/", 1)[-1] for alias, path in _GO_SPEC.findall(clause)]
    elif key == "java":
        names += [path.rsplit(".", 1)[-1] for path in _JAVA_IMPORT.findall(prefix)]
    elif key == "rust":
        for tree in _RUST_USE.findall(prefix):
            names += [_before_as(leaf.rsplit("::", 1)[-1]) for leaf in re.split(r"[{},]", tree)]
    elif key in ("c", "cpp"):
        names += _C_CALL.findall(prefix)
    for module in filter(None, modules):
        names += re.findall(rf"(?<![\w$.]){re.escape(module)}\.([A-Za-z_$][\w$]*)", prefix)
    names = [n for n in dict.fromkeys(names) if re.fullmatch(r"[A-Za-z_$][\w$]*", n or "")
             and n not in _C_NOT_CALLS and n not in ("self", "super", "crate")]
    return sorted(names, key=lambda n: -_last_use(prefix, n))


def _before_as(name: str) -> str:
    return name.strip().split(" as ")[0].strip()


def _last_use(text: str, name: str) -> int:
    starts = [m.start() for m in re.finditer(rf"(?<![\w$]){re.escape(name)}(?![\w$])", text)]
    return starts[-1] if starts else -1


def build_context(
    index: RepoIndex,
    tok: Tokenizer,
    *,
    path: str,
    prefix: str,
    suffix: str,
    config: ContextConfig | None = None,
    recent: Sequence[tuple[str, str]] = (),
    repo_name: str | None = None,
) -> Assembled:
    """Retrieve for the cursor from `index` and assemble: what a server or benchmark calls.

    repo_name defaults to the repository directory's name (native style).
    """
    config = config or ContextConfig()
    snippets, definitions = [], []
    if config.style in ("commented", "native"):
        query = query_for_cursor(prefix, suffix, lines=config.query_lines)
        snippets = index.search(query, k=config.max_snippets, exclude_path=path)
        if config.include_definitions:
            # A common name can be defined in many files: a few definitions per name, a few names.
            found = index.definitions(imported_names(prefix, language_of(path)))
            per_name: dict[str | None, int] = {}
            for d in found:
                per_name[d.name] = per_name.get(d.name, 0) + 1
                if per_name[d.name] <= 2 and d.path != path:
                    definitions.append(d)
            definitions = definitions[: config.max_snippets]
    return assemble(tok, path=path, prefix=prefix, suffix=suffix, snippets=snippets, definitions=definitions,
                    recent=recent if config.include_recent else (), style=config.style, budget=config.budget,
                    repo_name=index.root.name if repo_name is None else repo_name, file_share=config.file_share)

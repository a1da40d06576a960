"""Split a source file into retrievable chunks: functions, classes and blocks of top-level code.

With tree-sitter and a grammar installed (python, javascript, typescript, java, go, rust, c, cpp:
`pip install 'starcoder2[repo]'`), a file is cut along its syntax tree: every definition that fits in
`max_lines` is one chunk; a larger class-like definition becomes a header chunk (signature,
docstring, fields) plus its members; a larger function is cut into `max_lines` parts (the first part
keeps the name, the rest are unnamed "block" parts). Top-level statements between definitions
(imports, constants) are grouped into "block" chunks. Other languages, files that do not parse and
machines without tree-sitter get overlapping line windows (kind "window").

Lines are 1-based and inclusive; `Chunk.text` is exactly lines start_line..end_line joined with
"\\n", so chunks of one file can be merged back by line number.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

from starcoder2.data.language import language_of


@dataclass(frozen=True)
class Chunk:
    path: str  # repository-relative, "/"-separated
    start_line: int  # 1-based, inclusive
    end_line: int  # 1-based, inclusive
    kind: str  # "function" | "class" | "block" | "window"
    name: str | None  # the defined name for functions and classes (first part only), else None
    text: str


@dataclass(frozen=True)
class Snippet(Chunk):
    """A chunk returned by retrieval; higher `score` is more relevant (BM25, or 0 for definitions)."""

    score: float = 0.0


# Linguist name (data/language.py) or common alias -> grammar key used below.
_LANGUAGE_KEYS = {
    "python": "python", "javascript": "javascript", "js": "javascript", "jsx": "javascript",
    "typescript": "typescript", "ts": "typescript", "tsx": "tsx", "java": "java", "go": "go",
    "rust": "rust", "c": "c", "c++": "cpp", "cpp": "cpp", "cuda": "cpp",
}
# grammar key -> (module, function returning the language pointer)
_GRAMMARS = {
    "python": ("tree_sitter_python", "language"),
    "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "java": ("tree_sitter_java", "language"),
    "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "c": ("tree_sitter_c", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
}
# Node types that define something, across the grammars above. Wrappers (decorators, `export`,
# C++ templates) count as definitions too; their name comes from the wrapped node.
_FUNCTION_TYPES = {
    "function_definition", "function_declaration", "generator_function_declaration", "method_definition",
    "method_declaration", "constructor_declaration", "function_item", "macro_definition", "arrow_function",
}
_CLASS_TYPES = {
    "class_definition", "class_declaration", "abstract_class_declaration", "interface_declaration",
    "enum_declaration", "record_declaration", "type_alias_declaration", "type_declaration", "struct_item",
    "enum_item", "trait_item", "impl_item", "mod_item", "class_specifier", "struct_specifier",
    "namespace_definition", "annotation_type_declaration",
}
_WRAPPER_TYPES = {"decorated_definition", "export_statement", "template_declaration"}
_VARIABLE_TYPES = {"lexical_declaration", "variable_declaration"}  # `const f = () => ...` in JS/TS
_BODY_FIELDS = ("body", "definition", "declaration")
_COMMENT_TYPES = {"comment", "line_comment", "block_comment"}


def language_key(language: str | None, path: str | None = None) -> str | None:
    """The grammar key for a language name ("Python", "C++", "ts", ...), else guessed from `path`."""
    if language is None and path is not None:
        language = language_of(path)
    key = None if language is None else _LANGUAGE_KEYS.get(language.lower())
    return "tsx" if key == "typescript" and path is not None and path.endswith(".tsx") else key


def chunk_file(
    path: str, text: str, language: str | None = None, *, max_lines: int = 60, overlap: int | None = None
) -> list[Chunk]:
    """Chunks covering `text`: syntax-aware where a grammar is installed, else line windows.

    `overlap` (default max_lines // 4) applies to line windows only.
    """
    if max_lines < 2:
        raise ValueError(f"max_lines={max_lines} must be at least 2")
    lines = text.split("\n")
    parser = _parser(language_key(language, path))
    if parser is not None:
        tree = parser.parse(text.encode("utf-8", "surrogatepass"))
        if not tree.root_node.has_error:  # a broken file is better served by plain windows
            chunks = _chunk_nodes(path, lines, tree.root_node.named_children, max_lines)
            return [c for c in chunks if c.text.strip()]
    step = max_lines - (max_lines // 4 if overlap is None else min(overlap, max_lines - 1))
    return [c for c in _windows(path, lines, 1, len(lines), max_lines, step, "window", None) if c.text.strip()]


@functools.cache
def _language(key: str):
    """A tree-sitter Language, or None when tree-sitter or the grammar is not installed."""
    try:
        from tree_sitter import Language
        module_name, function = _GRAMMARS[key]
        return Language(getattr(importlib.import_module(module_name), function)())
    except (ImportError, AttributeError, KeyError):
        return None


def _parser(key: str | None):
    # Parsers are not thread-safe, so each call gets its own (cheap); Languages are cached.
    language = None if key is None else _language(key)
    if language is None:
        return None
    from tree_sitter import Parser
    return Parser(language)


def _span(node) -> tuple[int, int]:
    """1-based inclusive line span; a node ending at column 0 ends on the previous line."""
    end_row = node.end_point[0] - (1 if node.end_point[1] == 0 and node.end_point[0] > node.start_point[0] else 0)
    return node.start_point[0] + 1, end_row + 1


def _chunk(path: str, lines: list[str], start: int, end: int, kind: str, name: str | None) -> Chunk:
    return Chunk(path, start, end, kind, name, "\n".join(lines[start - 1 : end]))


def _windows(path, lines, start, end, size, step, kind, name) -> list[Chunk]:
    """Windows of `size` lines every `step` lines over start..end.

    Only the first keeps `kind` and `name`; later parts of a cut definition are unnamed "block"s.
    """
    out = []
    for first in range(start, end + 1, step):
        last = min(first + size - 1, end)
        if out:
            kind, name = ("window" if kind == "window" else "block"), None
        out.append(_chunk(path, lines, first, last, kind, name))
        if last == end:
            break
    return out


def _definition(node):
    """(kind, name, node whose body holds members) if `node` defines something, else None."""
    if node.type in _WRAPPER_TYPES:
        inner = next((node.child_by_field_name(f) for f in _BODY_FIELDS if node.child_by_field_name(f)), None)
        if inner is None:  # template_declaration: the declaration is the last named child
            inner = node.named_children[-1] if node.named_children else None
        return None if inner is None else _definition(inner)
    if node.type in _VARIABLE_TYPES:
        for decl in node.named_children:
            value = decl.child_by_field_name("value")
            if value is not None and value.type in ("arrow_function", "function_expression", "function", "class"):
                return ("class" if value.type == "class" else "function"), _text(decl.child_by_field_name("name")), None
        return None
    if node.type in _FUNCTION_TYPES:
        return "function", _name(node), None
    if node.type in _CLASS_TYPES:
        return "class", _name(node), node.child_by_field_name("body")
    return None


def _name(node) -> str | None:
    named = node.child_by_field_name("name")
    if named is None and node.type == "impl_item":  # Rust: impl Trait for Type -> Type
        named = node.child_by_field_name("type")
    if named is None and node.type == "type_declaration":  # Go: type X struct {...}
        spec = next((c for c in node.named_children if c.type in ("type_spec", "type_alias")), None)
        named = None if spec is None else spec.child_by_field_name("name")
    declarator = node.child_by_field_name("declarator")
    while named is None and declarator is not None:  # C/C++: int *f(int x) -> f
        if declarator.type in ("identifier", "field_identifier", "qualified_identifier", "destructor_name",
                               "operator_name"):
            named = declarator
        else:
            declarator = declarator.child_by_field_name("declarator")
    text = _text(named)
    return None if text is None else text.rsplit("::", 1)[-1]


def _text(node) -> str | None:
    return None if node is None or node.text is None else node.text.decode("utf-8", "replace")


def _chunk_nodes(path: str, lines: list[str], nodes, max_lines: int) -> list[Chunk]:
    """Definitions become their own chunks; runs of other statements are grouped into blocks.

    Comments right above a definition (no blank line between) document it and join its chunk.
    """
    out: list[Chunk] = []
    pending: list[int] = []  # [start, end] of the current run of non-definition statements
    comments_from = None  # first line of the comment nodes that end the pending run

    def flush(end: int | None = None):
        if pending and (end is None or end >= pending[0]):
            last = pending[1] if end is None else end
            while last > pending[0] and not lines[last - 1].strip():  # blank lines before a comment
                last -= 1
            out.extend(_windows(path, lines, pending[0], last, max_lines, max_lines, "block", None))
        pending.clear()

    for node in nodes:
        start, end = _span(node)
        definition = _definition(node)
        if definition is None:
            if pending and end - pending[0] + 1 > max_lines:
                flush()
            is_comment = node.type in _COMMENT_TYPES
            if not is_comment:
                comments_from = None
            elif comments_from is None or not pending or start > pending[1] + 1:
                comments_from = start
            pending[:] = [pending[0] if pending else start, end]
            continue
        if pending and comments_from is not None and pending[1] == start - 1:
            flush(comments_from - 1)
            start = comments_from
        flush()
        comments_from = None
        out.extend(_chunk_definition(path, lines, node, start, end, definition, max_lines))
    flush()
    return out


def _chunk_definition(path, lines, node, start, end, definition, max_lines) -> list[Chunk]:
    kind, name, body = definition
    if end - start + 1 <= max_lines:
        return [_chunk(path, lines, start, end, kind, name)]
    members = [] if body is None else [c for c in body.named_children if _definition(c) is not None]
    if not members:
        return _windows(path, lines, start, end, max_lines, max_lines, kind, name)
    # A big class: its header (up to the first member) as the named chunk, then every member.
    header_end = min(_span(members[0])[0] - 1, start + max_lines - 1)
    header = [_chunk(path, lines, start, max(start, header_end), kind, name)]
    rest = [c for c in body.named_children if _span(c)[0] > header_end]
    return header + _chunk_nodes(path, lines, rest, max_lines)

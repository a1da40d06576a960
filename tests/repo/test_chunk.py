"""chunk_file: syntax-aware chunks for Python and JavaScript (and a few brace languages), windows otherwise."""

from __future__ import annotations

import inspect
import json.decoder
import sys
import textwrap

import pytest

from starcoder2.repo import chunk as chunk_module
from starcoder2.repo.chunk import chunk_file

PYTHON = textwrap.dedent('''
    """Module docstring."""
    import os

    LIMIT = 3


    # Adds two numbers.
    # (a comment right above a definition belongs to it)
    def add(a, b):
        return a + b


    @staticmethod
    def decorated():
        pass


    class Small:
        def method(self):
            return 1
    ''').lstrip("\n")

JAVASCRIPT = textwrap.dedent("""
    import { a } from './a.js';

    // Adds two numbers.
    export function add(x, y) {
      return x + y;
    }

    const mul = (x, y) => x * y;

    class Shape extends Base {
      area() { return 0; }
    }
    module.exports = { add };
    """).lstrip("\n")


def _summary(chunks):
    return [(c.kind, c.name, c.start_line, c.end_line) for c in chunks]


def test_python_definitions_blocks_and_comments():
    chunks = chunk_file("m.py", PYTHON)
    assert _summary(chunks) == [
        ("block", None, 1, 4), ("function", "add", 7, 10), ("function", "decorated", 13, 15), ("class", "Small", 18, 20)]
    lines = PYTHON.split("\n")
    for c in chunks:  # text is exactly the lines it names
        assert c.text == "\n".join(lines[c.start_line - 1 : c.end_line]) and c.path == "m.py"
    assert chunks[1].text.startswith("# Adds two numbers.") and chunks[2].text.startswith("@staticmethod")


def test_javascript_functions_arrows_and_classes():
    assert _summary(chunk_file("a.js", JAVASCRIPT)) == [
        ("block", None, 1, 1), ("function", "add", 3, 6), ("function", "mul", 8, 8), ("class", "Shape", 10, 12),
        ("block", None, 13, 13)]


@pytest.mark.parametrize("path, code, expected", [
    ("a.c", "#include <x.h>\nstatic int *foo(int a) {\n  return 0;\n}\n", [("block", None), ("function", "foo")]),
    ("a.go", "package m\n\ntype T struct{}\n\nfunc (t T) M() int { return 1 }\n", [("block", None), ("class", "T"), ("function", "M")]),
    ("a.rs", "struct A;\nimpl Show for A { fn show(&self) {} }\n", [("class", "A"), ("class", "A")]),
    ("A.java", "class A {\n  void m() {}\n}\n", [("class", "A")]),
    ("a.ts", "interface I { x: number }\ntype T = string;\n", [("class", "I"), ("class", "T")]),
    ("a.tsx", "export function App() {\n  return <div>hi</div>;\n}\n", [("function", "App")]),
])
def test_brace_languages(path, code, expected):
    assert [(c.kind, c.name) for c in chunk_file(path, code)] == expected


def test_big_class_is_split_into_header_and_members_and_big_functions_into_parts():
    source = inspect.getsource(json.decoder)
    chunks = chunk_file("json/decoder.py", source, max_lines=40)
    assert all(c.end_line - c.start_line + 1 <= 40 for c in chunks)
    names = [c.name for c in chunks if c.name]
    assert {"JSONDecoder", "__init__", "decode", "raw_decode", "py_scanstring", "JSONObject"} <= set(names)
    header = next(c for c in chunks if c.name == "JSONDecoder")
    assert header.kind == "class" and header.text.startswith("class JSONDecoder(object):")
    assert "def decode(" not in header.text  # its methods are chunks of their own
    # A function longer than max_lines: the first part keeps the name, the following parts are blocks.
    parts = [c for c in chunks if c.start_line >= 69 and c.end_line <= 126]
    assert parts[0].name == "py_scanstring" and parts[1].kind == "block" and parts[1].start_line == parts[0].end_line + 1


@pytest.mark.parametrize("disable", [False, True])
def test_line_windows_overlap_and_cover_every_line(monkeypatch, request, disable):
    if disable:  # as on a machine without tree-sitter: Python falls back to windows too
        monkeypatch.setitem(sys.modules, "tree_sitter", None)  # `import tree_sitter` raises ImportError
        chunk_module._language.cache_clear()
        request.addfinalizer(chunk_module._language.cache_clear)  # forget the misses it caches now
    path = "notes.py" if disable else "notes.unknownext"
    text = "\n".join(f"line_{i} = {i}" for i in range(1, 101))
    chunks = chunk_file(path, text, max_lines=20)
    assert {c.kind for c in chunks} == {"window"}
    assert [(c.start_line, c.end_line) for c in chunks] == [(1, 20), (16, 35), (31, 50), (46, 65), (61, 80), (76, 95), (91, 100)]
    covered = {n for c in chunks for n in range(c.start_line, c.end_line + 1)}
    assert covered == set(range(1, 101))


def test_a_file_that_does_not_parse_gets_windows():
    chunks = chunk_file("broken.py", "def f(:\n    return )\n", max_lines=10)
    assert _summary(chunks) == [("window", None, 1, 3)]
    with pytest.raises(ValueError):
        chunk_file("a.py", "x = 1", max_lines=1)

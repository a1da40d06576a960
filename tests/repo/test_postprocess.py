"""postprocess: tables of editor cases for Python and brace languages."""

from __future__ import annotations

import pytest

from starcoder2.repo import postprocess

# (completion, prefix, suffix, mode, expected)
PYTHON = [
    # single line: stop at the end of the line
    ("x + 1\n    return y\n", "def f(x):\n    y = ", "\n", "auto", "x + 1"),
    ("compute(a, b)   \nprint(1)", "result = ", "\n", "single", "compute(a, b)"),
    # a closing bracket the suffix already holds is not repeated ...
    ("x + 1)\n    return y\n", "def f(x):\n    y = f(", ")\n    return y\n", "auto", "x + 1"),
    ("bar())", "x = foo(", ")\n", "auto", "bar()"),
    ("a, b):", "def f(", "):\n    pass\n", "auto", "a, b"),
    # ... but brackets the completion opens itself are kept
    ("bar()", "x = foo(", ")\n", "auto", "bar()"),
    ("s = ')'", "    ", "\n", "single", "s = ')'"),
    # the rest of the line regenerated
    ("total(items)", "x = ", "total(items)\n", "single", ""),
    ("a + total(items)", "x = ", "total(items)\n", "single", "a + "),
    # multi-line after a block opener: the block, not what follows it
    ("\n    return a + b\n\n\ndef g():\n    pass\n", "def add(a, b):", "\n", "auto", "\n    return a + b"),
    # on an empty line in a body: up to the end of the enclosing block
    ("return a + b\n\ndef g():\n    pass\n", "def add(a, b):\n    ", "\n", "auto", "return a + b"),
    ("if x:\n        a()\n    else:\n        b()\n    c = 1\nfoo()\n", "def f(x):\n    ", "\n", "auto",
     "if x:\n        a()\n    else:\n        b()\n    c = 1"),
    ("x = 1", "    if ok", ":\n", "multi", "x = 1"),
    ("\n        a()\n    else:\n        b()\n    c = 1", "def f(x):\n    if x:", "\n", "auto",
     "\n        a()\n    else:\n        b()"),
    # continuation lines inside brackets are not a dedent
    ("foo(a,\n  b)\n    return 1\n  x", "def f():\n    ", "\n", "multi", "foo(a,\n  b)\n    return 1"),
    # the next existing line regenerated: cut there
    ("y = 2\n    return y\n\ndef g():", "def f():\n    ", "\n    return y\n", "auto", "y = 2"),
    ("y = 2\n    z = 3\n    return y + z", "def f():\n    ", "\n    return y + z\n", "multi", "y = 2\n    z = 3"),
    # top level: a blank line ends the paragraph; trailing whitespace is trimmed on every line
    ("total = 0   \nfor x in xs:  \n    total += x\n\nprint(total)\n", "", "", "multi", "total = 0\nfor x in xs:\n    total += x"),
    # strings and comments do not count as brackets
    ("s = '('\n    t = 1  # )\n    return s\nx", "def f():\n    ", "\n", "multi", "s = '('\n    t = 1  # )\n    return s"),
    ('d = """\n)\n"""\n    return d\nz', "def f():\n    ", "\n", "multi", 'd = """\n)\n"""\n    return d'),
    # a new line typed before code that stays on the cursor's line keeps its newline
    ("x = 1\n", "def f():\n    ", "return x\n", "auto", "x = 1\n    "),
]

BRACES = [
    ("javascript", "1;", "x = ", ";\n", "single", "1"),
    ("javascript", "items.map(x => x * 2));", "const ys = f(", ");\n", "auto", "items.map(x => x * 2)"),
    ("javascript", "a, b) {", "function f(", ") {\n}", "auto", "a, b"),
    # after "{": the block, with its closing brace when the suffix does not have it
    ("javascript", "\n  return a + b;\n}\n\nfunction g() {}\n", "function add(a, b) {", "\n", "auto",
     "\n  return a + b;\n}"),
    ("javascript", "\n  return a + b;\n}\n\nfunction g() {}\n", "function add(a, b) {", "\n}\n", "auto",
     "\n  return a + b;"),
    ("javascript", "const c = a + b;\n  return c;\n}\nfunction g() {}", "function add(a, b) {\n  ", "\n}\n", "auto",
     "const c = a + b;\n  return c;"),
    ("javascript", "if (x) {\n    y();\n  }\n  z();\n}\n", "function f(x) {\n  ", "\n}\n", "auto",
     "if (x) {\n    y();\n  }\n  z();"),
    ("javascript", "'}' + s;\n  }", "  return ", "\n}", "auto", "'}' + s;"),
    ("javascript", "`${a}}`;\n}", "  return ", "\n}", "multi", "`${a}}`;"),
    ("typescript", "name: string;\n  age: number;\n}\n\nexport type Y = 1;", "interface P {\n  ", "\n}\n", "auto",
     "name: string;\n  age: number;"),
    ("c", "x; // }\n  y;\n}", "int f() {\n  ", "\n}", "multi", "x; // }\n  y;"),
    ("c", "x; /* } */\n  return y;\n}\nint g() {", "int f() {\n  ", "\n}", "multi", "x; /* } */\n  return y;"),
    ("c", "i < n; i++) {", "for (int ", ") {\n", "auto", "i < n; i++"),
    ("java", "\n    return name;\n  }\n\n  public void x() {}", "  public String getName() {", "\n}\n", "auto",
     "\n    return name;\n  }"),
    ("go", "err != nil {\n\t\treturn err\n\t}\n\treturn nil\n}\n", "\tif ", "\n", "auto", "err != nil {"),
    ("go", "\n\t\treturn err\n\t}\n\treturn nil\n}\n", "\tif err != nil {", "\n", "auto", "\n\t\treturn err\n\t}"),
    ("rust", "v.iter().sum::<i32>()\n}\n\nfn g() {}", "fn total(v: &[i32]) -> i32 {\n    ", "\n}\n", "auto",
     "v.iter().sum::<i32>()"),
]


@pytest.mark.parametrize("completion, prefix, suffix, mode, expected", PYTHON)
def test_python(completion, prefix, suffix, mode, expected):
    assert postprocess(completion, prefix=prefix, suffix=suffix, mode=mode, language="Python") == expected


@pytest.mark.parametrize("language, completion, prefix, suffix, mode, expected", BRACES)
def test_brace_languages(language, completion, prefix, suffix, mode, expected):
    assert postprocess(completion, prefix=prefix, suffix=suffix, mode=mode, language=language) == expected


def test_unknown_language_uses_brackets_and_indentation():
    got = postprocess("a = 1\n  b = 2\nc = 3", prefix="block:\n  ", suffix="\n", mode="auto", language=None)
    assert got == "a = 1\n  b = 2"


def test_bad_mode():
    with pytest.raises(ValueError, match="unknown post-processing mode"):
        postprocess("x", prefix="", suffix="", mode="paragraph")

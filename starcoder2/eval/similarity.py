"""Similarity of a completion to its target, as code-completion benchmarks score it.

    exact_match("y = 1  \n", "y = 1")              -> True   (lines compared without trailing whitespace)
    edit_similarity("kitten", "sitting")           -> 0.571  (1 - Levenshtein / max length: RepoBench, CrossCodeEval)
    identifier_f1("x = foo(bar)", "y = foo(baz)")  -> 0.333  (CrossCodeEval's identifier match)

Identifiers are found with a regular expression and the language's keywords left out (CrossCodeEval
takes identifier nodes of a tree-sitter parse instead, which also skips words inside strings and
comments). Pure Python, no dependencies.
"""

from __future__ import annotations

import keyword
import re
from collections import Counter

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACE_KEYWORDS = frozenset({  # keywords and literals of the brace languages indexed (C, Go, Java, JS/TS, Rust)
    "if", "else", "for", "while", "do", "switch", "case", "break", "continue", "return", "function", "var",
    "let", "const", "new", "class", "extends", "import", "export", "from", "public", "private", "protected",
    "static", "final", "void", "int", "long", "char", "float", "double", "boolean", "struct", "enum", "fn",
    "pub", "mut", "impl", "trait", "use", "mod", "match", "loop", "func", "package", "type", "interface", "go",
    "defer", "range", "true", "false", "null", "nil", "this", "self", "super", "try", "catch", "finally",
    "throw", "throws", "typeof", "instanceof",
})


def normalize(code: str) -> str:
    """Lines without trailing whitespace, without blank lines at either end."""
    return "\n".join(line.rstrip() for line in code.split("\n")).strip("\n")


def exact_match(prediction: str, target: str) -> bool:
    return normalize(prediction) == normalize(target)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(prediction: str, target: str) -> float:
    """1 - Levenshtein(prediction, target) / max(len): 1.0 for equal strings, 0.0 for nothing in common."""
    p, t = normalize(prediction), normalize(target)
    if not p and not t:
        return 1.0
    return 1.0 - levenshtein(p, t) / max(len(p), len(t))


def identifiers(code: str, language: str = "python") -> list[str]:
    words = keyword.kwlist + keyword.softkwlist + ["self", "cls"] if language == "python" else _BRACE_KEYWORDS
    stop = set(words)
    return [w for w in _IDENTIFIER.findall(code) if w not in stop]


def identifier_f1(prediction: str, target: str, language: str = "python") -> float:
    """F1 of the identifier multisets (SQuAD-style, as CrossCodeEval's identifier match); 1.0 when
    neither has identifiers, 0.0 when only one has."""
    p, t = Counter(identifiers(prediction, language)), Counter(identifiers(target, language))
    if not p or not t:
        return float(not p and not t)
    common = sum((p & t).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(t.values())
    return 2 * precision * recall / (precision + recall)

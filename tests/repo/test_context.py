"""assemble: exact budgets in every style, parity with prompts.py, nearest-first priority; import parsing."""

from __future__ import annotations

import pytest

from starcoder2.prompts import fim_prompt, repo_prompt
from starcoder2.repo import ContextConfig, RepoIndex, Snippet, assemble, build_context, imported_names, query_for_cursor
from starcoder2.repo.context import STYLES

from .conftest import PLANTED

PREFIX = "import os\n\n" + "".join(f"def helper_{i}(x):\n    return x + {i}\n\n" for i in range(30)) + "def main():\n    y = "
SUFFIX = "\n    return y\n\n" + "".join(f"VALUE_{i} = {i}\n" for i in range(30))
PATH = "app/main.py"


def _snippet(path, text, score=1.0, start=1, kind="snippet"):
    return Snippet(path, start, start + text.count("\n"), "function", None, text, score=score)


def test_none_and_file_styles_are_fim_prompt(tiny_tokenizer):
    for budget in (8, 30, 77, 10_000):
        want = fim_prompt(tiny_tokenizer, PREFIX, SUFFIX, max_tokens=budget)
        for style in ("none", "file"):
            got = assemble(tiny_tokenizer, path=PATH, prefix=PREFIX, suffix=SUFFIX, style=style, budget=budget,
                           snippets=[_snippet("b.py", "def b():\n    pass")])
            assert got.ids == want and got.included == []


def test_native_style_is_repo_prompt(tiny_tokenizer):
    tok, other = tiny_tokenizer, _snippet("lib/util.py", "def util(a):\n    return a * 2")
    whole = assemble(tok, path=PATH, prefix=PREFIX, suffix=SUFFIX, snippets=[other], budget=10_000, repo_name="demo")
    assert whole.ids == repo_prompt(tok, [("lib/util.py", other.text + "\n")], PATH, PREFIX, SUFFIX, repo_name="demo")
    assert not whole.truncated and whole.text.startswith("<repo_name>demo<file_sep>lib/util.py\ndef util(a):")
    for budget in (20, 64, 150):  # no context: the same cut as repo_prompt's
        got = assemble(tok, path=PATH, prefix=PREFIX, suffix=SUFFIX, budget=budget, repo_name=None)
        assert got.ids == repo_prompt(tok, [], PATH, PREFIX, SUFFIX, max_tokens=budget)
        unnamed = assemble(tok, path="", prefix=PREFIX, suffix=SUFFIX, budget=budget, repo_name="demo")
        assert unnamed.ids == repo_prompt(tok, [], None, PREFIX, SUFFIX, repo_name="demo", max_tokens=budget)


@pytest.mark.parametrize("style", STYLES)
def test_budget_is_respected_to_the_token(tiny_tokenizer, style):
    context = dict(
        definitions=[_snippet("lib/defs.py", "def helper(x):\n    return x\n" * 3)],
        snippets=[_snippet(f"lib/s{i}.py", f"def s{i}():\n    return {i}", score=i) for i in range(5)],
        recent=[("notes/recent.py", "".join(f"R_{i} = {i}\n" for i in range(40)))],
    )
    sizes = set()
    for budget in range(30, 700, 23):
        for share in (0.0, 0.5, 1.0):
            a = assemble(tiny_tokenizer, path=PATH, prefix=PREFIX, suffix=SUFFIX, style=style, budget=budget,
                         repo_name="demo", file_share=share, **context)
            # The current file alone is larger than every budget here, so the prompt fills it exactly.
            assert len(a.ids) == budget and a.truncated
            assert sum(p.tokens for p in a.included) <= budget
            sizes.add(len(a.included))
    assert len(sizes) > 1 or style in ("none", "file")
    with pytest.raises(ValueError, match="fixed tokens"):
        assemble(tiny_tokenizer, path=PATH, prefix=PREFIX, suffix=SUFFIX, style=style, budget=2, repo_name="demo")


def test_the_cursor_is_kept_first(tiny_tokenizer):
    tok = tiny_tokenizer
    a = assemble(tok, path=PATH, prefix=PREFIX, suffix=SUFFIX, budget=40,
                 definitions=[_snippet("lib/d.py", "def d():\n    pass")])
    prefix_ids, suffix_ids = tok.encode(PREFIX), tok.encode(SUFFIX)
    cut = a.ids.index(tok.fim_suffix_id)
    assert a.ids[cut - a.prefix_tokens : cut] == prefix_ids[-a.prefix_tokens :]  # the prefix's tail
    assert a.ids[cut + 1 : cut + 1 + a.suffix_tokens] == suffix_ids[: a.suffix_tokens]  # the suffix's head
    assert a.prefix_tokens >= 3 * (a.prefix_tokens + a.suffix_tokens) // 4
    assert [p.reason for p in a.dropped] == ["budget"] and a.included == []


def test_context_is_added_nearest_first(tiny_tokenizer):
    """Equal-cost items: as the budget grows, what is included grows along the priority order."""
    tok, body = tiny_tokenizer, "def same(a): return a + 1"  # one line: a recent file is never cut
    small_prefix, small_suffix = "def main():\n    y = ", "\n    return y\n"
    definitions = [_snippet("d1.py", body)]
    snippets = [_snippet("s1.py", body, score=1.0), _snippet("s3.py", body, score=3.0), _snippet("s2.py", body, score=2.0)]
    recent = [("r1.py", body)]
    priority = [("definition", "d1.py"), ("snippet", "s3.py"), ("snippet", "s2.py"), ("snippet", "s1.py"), ("recent", "r1.py")]
    seen = []
    for budget in range(30, 400, 3):
        a = assemble(tok, path=PATH, prefix=small_prefix, suffix=small_suffix, definitions=definitions,
                     snippets=snippets, recent=recent, budget=budget, file_share=1.0)
        assert not a.truncated  # the current file comes first: whole before any context
        got = [(p.kind, p.path) for p in a.included]
        assert got == priority[: len(got)] and len({p.tokens for p in a.included}) <= 1
        seen.append(len(got))
    assert seen[0] == 0 and seen[-1] == len(priority) and seen == sorted(seen)
    # In the prompt, the most relevant section sits right before the current file.
    order = [a.text.index(f"<file_sep>{p}\n") for _, p in reversed(priority)]
    assert order == sorted(order) and a.text.index("<file_sep>d1.py") < a.text.index(f"<fim_prefix>{PATH}")


def test_merging_same_file_and_dropping_the_current_file(tiny_tokenizer):
    lines = [f"def f{i}():\n    return {i}" for i in range(4)]
    definition = _snippet("lib/x.py", lines[0] + "\n" + lines[1], start=1)  # lines 1-4
    overlapping = _snippet("lib/x.py", lines[1] + "\n" + lines[2], start=3, score=2.0)  # lines 3-6
    own = _snippet(PATH, "def main():\n    pass", score=9.0)
    a = assemble(tiny_tokenizer, path=PATH, prefix="y = ", suffix="\n", definitions=[definition],
                 snippets=[own, overlapping], budget=4096, repo_name="demo")
    assert a.text.count("<file_sep>lib/x.py\n") == 1 and a.text.count("def f1():") == 1
    assert "def f2():" in a.text and 0 < a.included[1].tokens < a.included[0].tokens
    assert [(p.path, p.reason) for p in a.dropped] == [(PATH, "current_file")]


def test_a_recent_file_too_long_contributes_its_head(tiny_tokenizer):
    text = "".join(f"CONSTANT_NUMBER_{i} = {i}\n" for i in range(200))
    a = assemble(tiny_tokenizer, path=PATH, prefix="y = ", suffix="\n", recent=[("consts.py", text)], budget=300,
                 style="commented")
    [part] = a.included
    assert part.kind == "recent" and part.start_line == 1 and 5 < part.end_line < 200 and len(a.ids) <= 300
    assert "# CONSTANT_NUMBER_0 = 0\n" in a.text and "CONSTANT_NUMBER_199" not in a.text
    assert a.text.startswith("<fim_prefix># Path: consts.py\n") and "# Path: app/main.py\ny = <fim_suffix>" in a.text


@pytest.mark.parametrize("language, prefix, expected", [
    ("Python", "from a.b import (x,\n    y as z)\nimport pkg.mod as m, os\n\nm.run(x)\nos.path.join()\nq = y(",
     ["y", "path", "x", "run"]),  # most recently used first
    ("JavaScript", ("import React, { useState as s } from 'react';\nimport * as u from './u';\n"
                    "const { a: b, c } = require('./m');\nu.fmt(c);\n"), ["c", "fmt", "a", "useState", "React"]),
    ("TypeScript", "import type { Shape } from './shape';\nlet s: Shape;", ["Shape"]),
    ("Go", 'import (\n\t"fmt"\n\tstr "example.com/strutil"\n)\nfunc f() { str.Reverse(fmt.Sprint(1)) }',
     ["Sprint", "Reverse"]),
    ("Java", "import java.util.List;\nimport static org.x.Assert.assertTrue;\nclass A { List<String> l; }", ["List", "assertTrue"]),
    ("Rust", "use crate::shapes::{Circle, area as a};\nuse std::io;\nfn f() { Circle::new(); }", ["Circle", "io", "area"]),
    ("C", '#include "geo.h"\nint f(void) { if (x) return distance(p, q); }', ["distance", "f"]),
    ("Markdown", "import x", []),
])
def test_imported_names(language, prefix, expected):
    assert imported_names(prefix, language) == expected


def test_query_for_cursor():
    assert query_for_cursor("a\nb\nc\nd", "e\nf\ng", lines=2, suffix_lines=1) == "c\nd\ne"


def test_build_context_puts_the_planted_definition_in_the_prompt(shop_repo, tiny_tokenizer):
    prefix = f"from shop.shipping import {PLANTED}\n\n\ndef checkout(cart, zone):\n    cost = "
    with RepoIndex.open(shop_repo) as index:
        index.update(show_progress=False)
        native = build_context(index, tiny_tokenizer, path="shop/checkout.py", prefix=prefix, suffix="\n")
        commented = build_context(index, tiny_tokenizer, path="shop/checkout.py", prefix=prefix, suffix="\n",
                                  config=ContextConfig(style="commented", max_snippets=2))
        plain = build_context(index, tiny_tokenizer, path="shop/checkout.py", prefix=prefix, suffix="\n",
                              config=ContextConfig(style="none"))
    assert native.text.startswith("<repo_name>shop<file_sep>")
    assert "<file_sep>shop/shipping.py\n" in native.text and f"def {PLANTED}(weight_kg, zone):" in native.text
    assert native.included[0] == native.included[0].__class__("definition", "shop/shipping.py", 4, 6,
                                                               native.included[0].tokens)
    assert "# Path: shop/shipping.py\n" in commented.text and f"# def {PLANTED}(weight_kg, zone):" in commented.text
    assert "shop/shipping.py" not in plain.text and plain.text.startswith("<fim_prefix>from shop")
    with pytest.raises(ValueError, match="unknown context style"):
        ContextConfig(style="fancy")

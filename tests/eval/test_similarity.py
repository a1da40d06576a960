"""Completion similarity metrics against known values (Levenshtein textbook pairs, hand-computed F1)."""

import pytest

from starcoder2.eval.similarity import edit_similarity, exact_match, identifier_f1, levenshtein


@pytest.mark.parametrize("a, b, d", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "abc", 0),
                                     ("intention", "execution", 5), ("a", "b", 1)])
def test_levenshtein_known_values(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def test_edit_similarity_and_exact_match():
    assert edit_similarity("return x", "return x  \n") == 1.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("", "") == 1.0 and edit_similarity("", "abc") == 0.0
    assert exact_match("y = 1  \n\n", "y = 1") and not exact_match("y = 2", "y = 1")


def test_identifier_f1_known_values():
    # pred {x, foo, bar}, target {y, foo, baz}: one in common -> P = R = 1/3
    assert identifier_f1("x = foo(bar)", "y = foo(baz)") == pytest.approx(1 / 3)
    assert identifier_f1("return self.x if True else None", "return x") == 1.0  # keywords and self do not count
    assert identifier_f1("a + a", "a") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multisets
    assert identifier_f1("1 + 2", "3") == 1.0 and identifier_f1("", "x") == 0.0
    assert identifier_f1("const s = a + b;", "let s = a + b;", "javascript") == 1.0

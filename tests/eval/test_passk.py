"""pass@k against exact combinatorics and the reference's known values."""

import math
from fractions import Fraction

import numpy as np
import pytest

from starcoder2.eval.passk import aggregate, pass_at_k


def exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def codex_numpy(n: int, c: int, k: int) -> float:
    """The Codex paper's numpy reference implementation, verbatim."""
    if n - c < k:
        return 1.0
    return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))


def test_known_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    for k in (1, 3, 7):
        assert pass_at_k(7, 7, k) == 1.0
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0  # greedy, n = 1


@pytest.mark.parametrize("n", [1, 2, 5, 20, 200])
def test_matches_exact_combinatorics(n):
    for c in range(n + 1):
        for k in sorted({1, 2, 5, 10, 100, n} & set(range(1, n + 1))):
            assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), abs=1e-12), (n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(codex_numpy(n, c, k), abs=1e-12)


def test_pass_at_1_is_the_fraction_correct():
    for n, c in [(20, 3), (50, 49), (200, 1)]:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_invalid_arguments():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_aggregate_averages_and_drops_unsupported_k():
    per_task = {"a": (5, 2), "b": (5, 5), "c": (5, 0)}
    out = aggregate(per_task, ks=(1, 2, 10))
    assert set(out) == {"pass@1", "pass@2"}  # k = 10 > 5 samples: not reported
    assert out["pass@1"] == pytest.approx((0.4 + 1.0 + 0.0) / 3)
    assert out["pass@2"] == pytest.approx((0.7 + 1.0 + 0.0) / 3)
    # greedy: pass@1 is the fraction of problems solved
    assert aggregate({f"t{i}": (1, int(i < 3)) for i in range(4)}) == {"pass@1": 0.75}
    # the smallest n decides which k are reported
    assert set(aggregate({"a": (200, 10), "b": (20, 1)})) == {"pass@1", "pass@10"}
    with pytest.raises(ValueError):
        aggregate({})

"""avg@k and the unbiased pass@k estimator (Chen et al., 2021), and `rlrt eval` end to end."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from rlrt_core.evaluation import avg_at_k, default_pass_ks, parse_ks, pass_at_k, pass_at_k_curve


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_exact_binomials():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(256, 1, 1), (256, 1, 128), (256, 3, 17), (256, 200, 40), (1024, 5, 512),
                                     (256, 0, 256), (256, 256, 1), (100, 1, 100)])
def test_pass_at_k_stable_for_large_n(n, c, k):
    # C(256, 128) ~ 1e75: the running product keeps full double precision
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), rel=1e-12, abs=1e-15)


def test_pass_at_k_is_unbiased():
    # the estimator is the exact fraction of k-subsets of the n samples that hold a correct one
    samples = [1, 0, 0, 1, 0, 0, 0, 0]
    for k in range(1, len(samples) + 1):
        subsets = list(itertools.combinations(samples, k))
        hit = sum(1 for s in subsets if any(s)) / len(subsets)
        assert pass_at_k(len(samples), sum(samples), k) == pytest.approx(hit, abs=1e-12)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"k=17 must lie in \[1, n=16\]"):
        pass_at_k(16, 3, 17)
    with pytest.raises(ValueError, match=r"c=17"):
        pass_at_k(16, 17, 1)
    with pytest.raises(ValueError, match="n >= 1"):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(4, 1, 0)


def test_avg_at_k_and_curve():
    rewards = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert avg_at_k(rewards) == pytest.approx((0.25 + 1 + 0) / 3)
    # problems weigh equally even with different sample counts
    assert avg_at_k([[1.0], [0.0, 0.0, 0.0]]) == pytest.approx(0.5)
    curve = pass_at_k_curve([(4, 1), (4, 4), (4, 0)], [1, 2, 4])
    assert curve[1] == pytest.approx(avg_at_k(rewards))
    assert curve[2] == pytest.approx((0.5 + 1 + 0) / 3)
    assert curve[4] == pytest.approx(2 / 3)
    assert list(curve) == [1, 2, 4]
    for bad in ([], [[]]):
        with pytest.raises(ValueError):
            avg_at_k(bad)
    with pytest.raises(ValueError, match="no problems"):
        pass_at_k_curve([], [1])


def test_k_lists():
    assert default_pass_ks(16) == [1, 2, 4, 8, 16]
    assert default_pass_ks(12) == [1, 2, 4, 8, 12]
    assert default_pass_ks(1) == [1]
    assert default_pass_ks(256)[-1] == 256 and len(default_pass_ks(256)) == 9
    assert parse_ks("4, 1,2,2", 8) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"k values \[32, 64\] outside \[1, 16\]"):
        parse_ks("1,32,64", 16)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_ks("1,two", 16)
    with pytest.raises(ValueError, match="no k values"):
        parse_ks(",", 16)

"""Percentiles read from counts agree with numpy's over every value, to the stated 1.8%."""

import numpy as np
import pytest

from lossx.compare.elementwise import Percentiles


@pytest.mark.parametrize("q", [50, 99, 99.9])
def test_a_percentile_from_counts_is_numpys_to_within_half_a_bin(q):
    rng = np.random.default_rng(0)
    parts = [np.abs(rng.standard_normal(n)) * 10.0 ** rng.integers(-9, 3) for n in (10, 1000, 5)]
    parts.append(np.zeros(200))  # exact zeros count as values
    counted = Percentiles()
    for part in parts:
        counted.add(part)
    want = np.percentile(np.concatenate(parts), q, method="inverted_cdf")
    assert counted.percentile(q) == pytest.approx(want, rel=10 ** (0.5 / 64) - 1)


def test_zeros_infinities_and_nothing():
    counted = Percentiles()
    assert counted.percentile(99) == 0.0  # no values
    counted.add(np.zeros(99))
    counted.add(np.array([np.inf]))
    assert counted.percentile(50) == 0.0
    assert counted.percentile(100) == np.inf  # Inf errors (a NaN on one side) stay Inf
